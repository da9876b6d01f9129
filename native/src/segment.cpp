#include "segment.h"

#include "weights.h"

namespace sw {

SegmentOutput segment(sw_seg_model &m, const SegmentRequest &r) {
    CallGuard guard;
    CallMemory memory(m.device);  // weights.h: large activations reused, not faulted in afresh
    const int64_t c = m.net->arch.classes;
    if (r.input.dim() != 4 || r.input.size(0) != 1 || r.input.size(1) != m.net->arch.in_channels)
        fail(SW_ERR_INVALID_ARGUMENT, "segmentation input must be one image with " +
                                          std::to_string(m.net->arch.in_channels) + " channels");
    const int64_t h = r.input.size(2), w = r.input.size(3);
    // Four 2x poolings: smaller inputs have nothing left to pool.
    if (h < 16 || w < 16)
        fail(SW_ERR_INVALID_ARGUMENT, "image is " + std::to_string(w) + "x" + std::to_string(h) +
                                          "; the segmentation model needs at least 16x16");
    for (auto k : r.subject)
        if (k < 0 || k >= std::max<int64_t>(c, 2))
            fail(SW_ERR_INVALID_ARGUMENT, "subject class " + std::to_string(k) + " out of range (the model has " +
                                              std::to_string(c) + " classes)");
    const int64_t oh = r.out_height > 0 ? r.out_height : h, ow = r.out_width > 0 ? r.out_width : w;
    auto logits = m.net->forward(r.input.to(m.device, scalar_type(m.dtype))).to(torch::kFloat32);
    if (oh != h || ow != w) logits = at::upsample_bilinear2d(logits, {oh, ow}, /*align_corners=*/false);
    SegmentOutput out;
    torch::Tensor labels;
    if (c == 1) {
        labels = (torch::sigmoid(logits[0][0]) > r.threshold).to(torch::kInt64);
    } else {
        labels = logits[0].argmax(0);
    }
    torch::Tensor subject;
    if (r.subject.empty()) {
        subject = labels != 0;
    } else {
        subject = torch::zeros_like(labels, torch::kBool);
        for (auto k : r.subject) subject = subject | (labels == k);
    }
    out.logits = logits.to(torch::kCPU).contiguous();
    out.labels = labels.to(torch::kUInt8).to(torch::kCPU).contiguous();
    out.mask = (subject.to(torch::kUInt8) * 255).to(torch::kCPU).contiguous();
    return out;
}

}  // namespace sw
