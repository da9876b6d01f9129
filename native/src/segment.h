// Segmentation inference: the U-Net's logits, resized to the output size,
// turned into class labels and a subject mask.
#pragma once

#include <vector>

#include "models.h"

namespace sw {

struct SegmentRequest {
    torch::Tensor input;  // float32 [1, C, h, w] in 0..1
    int64_t out_width = 0, out_height = 0;
    double threshold = 0.5;
    std::vector<int64_t> subject;  // empty: every class but 0
};

struct SegmentOutput {
    torch::Tensor logits;  // float32 [1, C, H, W] on the cpu, at the output size
    torch::Tensor labels;  // uint8 [H, W]
    torch::Tensor mask;    // uint8 [H, W], 255 = subject
};

SegmentOutput segment(sw_seg_model &m, const SegmentRequest &r);

}  // namespace sw
