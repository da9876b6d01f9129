// The segmentation U-Net in the Pytorch-UNet layout (inc, down1..4, up1..4, outc).
#pragma once

#include <array>

#include "layers.h"

namespace sw {

class SafeTensorsFile;

// Channel widths of every DoubleConv (in, mid, out) and of the transposed
// convolutions, as read from a checkpoint's shapes or derived from a base width.
struct SegArch {
    struct Double {
        int64_t in, mid, out;
    };
    int64_t in_channels = 3, classes = 2;
    bool bilinear = false;
    std::array<Double, 9> convs{};         // inc, down1..4, up1..4
    std::array<int64_t, 4> up_channels{};  // ConvTranspose2d in (out = in / 2); unused when bilinear

    static SegArch from_base(int64_t in_channels, int64_t classes, int64_t base, bool bilinear);
    static SegArch from_file(const SafeTensorsFile &f);
    // Fails (SW_ERR_FORMAT, naming source) unless the widths are positive,
    // bounded and chain: each block takes what the one before it gives.
    void validate(const std::string &source) const;
    std::string describe() const;
};

struct DoubleConvImpl : torch::nn::Module {
    explicit DoubleConvImpl(const SegArch::Double &d);
    torch::Tensor forward(const torch::Tensor &x);
    Conv2d conv1{nullptr}, conv2{nullptr};
    BatchNorm2d bn1{nullptr}, bn2{nullptr};
};
TORCH_MODULE(DoubleConv);

struct SegUNetImpl : torch::nn::Module {
    explicit SegUNetImpl(const SegArch &a);
    // x [B, C, H, W] in 0..1 -> logits [B, classes, H, W].
    torch::Tensor forward(const torch::Tensor &x);
    SegArch arch;
    DoubleConv inc{nullptr};
    std::array<DoubleConv, 4> downs{nullptr, nullptr, nullptr, nullptr};
    std::array<DoubleConv, 4> up_convs{nullptr, nullptr, nullptr, nullptr};
    std::array<ConvTranspose2d, 4> up_transposed{nullptr, nullptr, nullptr, nullptr};
    Conv2d outc{nullptr};
};
TORCH_MODULE(SegUNet);

}  // namespace sw
