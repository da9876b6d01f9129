package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/internal/safetensors"
	"github.com/stepwise-sd/stepwise/pipeline"
)

func newSegmentCommand() *cobra.Command {
	var ef engineFlags
	var model, out, saveLogits, data string
	var classes []int
	seg := pipeline.SegmentOptions{Scale: pipeline.DefaultSegmentScale, Threshold: pipeline.DefaultSegmentThreshold}
	cmd := newCommand("segment --model PATH IMAGE --out MASK.png",
		"find the subject of an image with a segmentation U-Net; writes its mask",
		cobra.ExactArgs(1), func(cmd *cobra.Command, args []string) error {
			img, err := pipeline.ReadImageFile(args[0], 0)
			if err != nil {
				return err
			}
			lib, err := ef.load(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			e := newRunner(lib, data, "", nil, ef.log)
			defer e.Cache.Close()
			seg.Model, seg.Classes = pipeline.ModelRef{Path: model}, classes
			res, err := e.Segment(context.Background(), img, seg, saveLogits != "")
			if err != nil {
				return err
			}
			if err := pipeline.WriteImageFile(out, res.Mask.Image()); err != nil {
				return err
			}
			if saveLogits != "" {
				if err := safetensors.Write(saveLogits, map[string]safetensors.Tensor{"logits": tensor(res.Logits)}, nil); err != nil {
					return fmt.Errorf("save logits: %w", err)
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s (subject %.1f%% of %dx%d, %d classes, %.2fs)\n", out, 100*res.Mask.Covers(),
				res.Mask.Width, res.Mask.Height, res.Classes, res.Elapsed.Seconds())
			return nil
		})
	ef.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&model, "model", "", "segmentation U-Net: .safetensors or the training script's .pth (required)")
	fs.StringVar(&out, "out", "", "mask PNG to write, subject white (required)")
	fs.Float64Var(&seg.Scale, "scale", seg.Scale, "resize factor for the network's input (the mask keeps the image's size)")
	fs.IntSliceVar(&classes, "classes", nil, "classes that are the subject, e.g. 1,3 (default: every class but 0)")
	fs.Float32Var(&seg.Threshold, "threshold", seg.Threshold, "one-class models: sigmoid threshold")
	fs.StringVar(&saveLogits, "save-logits", "", "also write float32 logits [1,C,H,W] at the image's size to this .safetensors")
	fs.StringVar(&data, "data", defaultDataDir(), "data folder (conversions of .pth files are cached here)")
	for _, name := range []string{"model", "out"} {
		_ = cmd.MarkFlagRequired(name)
	}
	_ = cmd.MarkFlagFilename("model", "safetensors", "pth")
	_ = cmd.MarkFlagDirname("data")
	return cmd
}
