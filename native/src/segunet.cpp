#include "segunet.h"

#include "common.h"
#include "config.h"
#include "safetensors.h"

namespace sw {

namespace {
const std::array<std::string, 9> kConvPrefix = {
    "inc.double_conv.",
    "down1.maxpool_conv.1.double_conv.", "down2.maxpool_conv.1.double_conv.",
    "down3.maxpool_conv.1.double_conv.", "down4.maxpool_conv.1.double_conv.",
    "up1.conv.double_conv.", "up2.conv.double_conv.", "up3.conv.double_conv.", "up4.conv.double_conv.",
};
}  // namespace

SegArch SegArch::from_base(int64_t in_channels, int64_t classes, int64_t w, bool bilinear) {
    if (in_channels <= 0 || classes <= 0 || w <= 0)
        fail(SW_ERR_INVALID_ARGUMENT, "segmentation U-Net: channels, classes and width must be positive");
    if (in_channels > kMaxWidth || w > kMaxWidth / 16)
        fail(SW_ERR_INVALID_ARGUMENT, "segmentation U-Net: channels or width too large");
    SegArch a;
    a.in_channels = in_channels;
    a.classes = classes;
    a.bilinear = bilinear;
    const int64_t f = bilinear ? 2 : 1;
    a.convs[0] = {in_channels, w, w};
    a.convs[1] = {w, 2 * w, 2 * w};
    a.convs[2] = {2 * w, 4 * w, 4 * w};
    a.convs[3] = {4 * w, 8 * w, 8 * w};
    a.convs[4] = {8 * w, 16 * w / f, 16 * w / f};
    const std::array<int64_t, 4> up_in = {16 * w, 8 * w, 4 * w, 2 * w};
    const std::array<int64_t, 4> up_out = {8 * w / f, 4 * w / f, 2 * w / f, w};
    for (int i = 0; i < 4; i++) {
        a.convs[5 + i] = {up_in[i], bilinear ? up_in[i] / 2 : up_out[i], up_out[i]};
        a.up_channels[i] = up_in[i];
    }
    a.validate("random segmentation U-Net");
    return a;
}

SegArch SegArch::from_file(const SafeTensorsFile &f) {
    SegArch a;
    auto shape = [&](const std::string &name, size_t dims) {
        const auto &s = f.entry(name).shape;
        if (s.size() != dims)
            fail(SW_ERR_FORMAT, f.path() + ": tensor " + name + " has " + std::to_string(s.size()) + " dimensions, want " +
                                    std::to_string(dims));
        return s;
    };
    for (size_t i = 0; i < kConvPrefix.size(); i++) {
        const auto c1 = shape(kConvPrefix[i] + "0.weight", 4);
        const auto c2 = shape(kConvPrefix[i] + "3.weight", 4);
        a.convs[i] = {c1[1], c1[0], c2[0]};
    }
    a.in_channels = a.convs[0].in;
    a.bilinear = !f.has("up1.up.weight");
    for (int i = 0; i < 4; i++) {
        if (!a.bilinear) a.up_channels[i] = shape("up" + std::to_string(i + 1) + ".up.weight", 4)[0];
    }
    a.classes = shape("outc.conv.weight", 4)[0];
    a.validate(f.path());
    return a;
}

void SegArch::validate(const std::string &source) const {
    auto bad = [&](const std::string &what) { fail(SW_ERR_FORMAT, source + ": segmentation U-Net " + what); };
    auto width = [&](const std::string &what, int64_t v) {
        if (v < 1 || v > kMaxWidth)
            bad(what + " has " + std::to_string(v) + " channels (want 1 to " + std::to_string(kMaxWidth) + ")");
    };
    width("input", in_channels);
    if (classes < 1 || classes > 255) bad("has " + std::to_string(classes) + " classes (want 1 to 255)");
    for (size_t i = 0; i < convs.size(); i++) {
        const std::string name = kConvPrefix[i].substr(0, kConvPrefix[i].find('.'));
        width(name + " in", convs[i].in);
        width(name + " mid", convs[i].mid);
        width(name + " out", convs[i].out);
    }
    if (convs[0].in != in_channels) bad("inc takes " + std::to_string(convs[0].in) + " channels, not the input's");
    for (size_t i = 1; i <= 4; i++)
        if (convs[i].in != convs[i - 1].out)
            bad("down" + std::to_string(i) + " takes " + std::to_string(convs[i].in) + " channels, the block before gives " +
                std::to_string(convs[i - 1].out));
    int64_t h = convs[4].out;
    for (size_t i = 0; i < 4; i++) {
        const std::string up = "up" + std::to_string(i + 1);
        if (!bilinear) {
            width(up + " transposed conv", up_channels[i]);
            if (up_channels[i] != h || up_channels[i] % 2 != 0)
                bad(up + " upsamples " + std::to_string(up_channels[i]) + " channels (want " + std::to_string(h) +
                    ", an even number)");
            h = up_channels[i] / 2;
        }
        const int64_t skip = convs[3 - i].out;
        if (convs[5 + i].in != skip + h)
            bad(up + " takes " + std::to_string(convs[5 + i].in) + " channels, the skip and the upsampled give " +
                std::to_string(skip + h));
        h = convs[5 + i].out;
    }
}

std::string SegArch::describe() const {
    return "seg-unet " + std::to_string(in_channels) + "->" + std::to_string(classes) + " width " +
           std::to_string(convs[0].out) + (bilinear ? " bilinear" : " convtranspose");
}

DoubleConvImpl::DoubleConvImpl(const SegArch::Double &d) {
    auto seq = register_module("double_conv", torch::nn::ModuleList());
    conv1 = Conv2d(d.in, d.mid, 3, 1, 1, false);
    bn1 = BatchNorm2d(d.mid);
    conv2 = Conv2d(d.mid, d.out, 3, 1, 1, false);
    bn2 = BatchNorm2d(d.out);
    seq->push_back(conv1);
    seq->push_back(bn1);
    seq->push_back(torch::nn::ReLU());
    seq->push_back(conv2);
    seq->push_back(bn2);
    seq->push_back(torch::nn::ReLU());
}

torch::Tensor DoubleConvImpl::forward(const torch::Tensor &x) {
    auto h = at::relu(bn1(conv1(x)));
    check_cancel();  // at full resolution one convolution is most of a block
    return at::relu(bn2(conv2(h)));
}

SegUNetImpl::SegUNetImpl(const SegArch &a) : arch(a) {
    inc = register_module("inc", DoubleConv(a.convs[0]));
    for (int i = 0; i < 4; i++) {
        auto down = register_module("down" + std::to_string(i + 1), std::make_shared<torch::nn::Module>());
        auto seq = down->register_module("maxpool_conv", torch::nn::ModuleList());
        seq->push_back(torch::nn::MaxPool2d(2));
        downs[i] = DoubleConv(a.convs[1 + i]);
        seq->push_back(downs[i]);
    }
    for (int i = 0; i < 4; i++) {
        auto up = register_module("up" + std::to_string(i + 1), std::make_shared<torch::nn::Module>());
        if (!a.bilinear) {
            up_transposed[i] = ConvTranspose2d(a.up_channels[i], a.up_channels[i] / 2, 2, 2);
            up->register_module("up", up_transposed[i]);
        }
        up_convs[i] = DoubleConv(a.convs[5 + i]);
        up->register_module("conv", up_convs[i]);
    }
    auto out = register_module("outc", std::make_shared<torch::nn::Module>());
    outc = Conv2d(a.convs[8].out, a.classes, 1);
    out->register_module("conv", outc);
}

torch::Tensor SegUNetImpl::forward(const torch::Tensor &x) {
    std::array<torch::Tensor, 5> skips;
    check_cancel();
    skips[0] = inc(x);
    for (int i = 0; i < 4; i++) {
        check_cancel();
        skips[i + 1] = downs[i](at::max_pool2d(skips[i], {2, 2}));
    }
    auto h = skips[4];
    for (int i = 0; i < 4; i++) {
        check_cancel();
        const auto &skip = skips[3 - i];
        if (arch.bilinear) {
            h = at::upsample_bilinear2d(h, {h.size(2) * 2, h.size(3) * 2}, /*align_corners=*/true);
        } else {
            h = up_transposed[i](h);
        }
        const int64_t dy = skip.size(2) - h.size(2), dx = skip.size(3) - h.size(3);
        if (dy != 0 || dx != 0) h = at::constant_pad_nd(h, {dx / 2, dx - dx / 2, dy / 2, dy - dy / 2}, 0);
        h = up_convs[i](torch::cat({skip, h}, 1));
    }
    check_cancel();
    return outc(h);
}

}  // namespace sw
