package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/pipeline"
)

// editFlags are edit's own flags.
type editFlags struct {
	engine          engineFlags
	gen             genFlags
	model, segModel string
	classes         []int
	data            string
	json            bool
	o               pipeline.EditOptions // the flags that map one to one
}

func (f *editFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	f.o = pipeline.DefaultEditOptions()
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model (default: the tiny demo model)")
	fs.StringVar(&f.segModel, "seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	f.gen.register(cmd, "what to paint around the subject")
	fs.IntVar(&f.o.WorkingSize, "size", f.o.WorkingSize, "working size: the long side the inpainting runs at")
	fs.Float64Var(&f.o.Segment.Scale, "scale", f.o.Segment.Scale, "segmentation input scale")
	fs.IntSliceVar(&f.classes, "classes", nil, "subject classes, e.g. 1,3 (default: every class but 0)")
	fs.BoolVar(&f.o.RepaintSubject, "repaint-subject", false, "repaint the subject instead of the background")
	fs.IntVar(&f.o.Grow, "grow", 0, "grow (> 0) or shrink (< 0) the repainted region, in pixels")
	fs.Float64Var(&f.o.MaskBlur, "mask-blur", f.o.MaskBlur, "feather the repainted region's edge (pixels)")
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder: runs/ and cache/ live here")
	fs.BoolVar(&f.json, "json", false, "print the result as JSON")
	_ = cmd.MarkFlagDirname("data")
}

// options are the pipeline's options for the flags, before the demo models
// fill in missing model paths.
func (f *editFlags) options() (pipeline.EditOptions, error) {
	r, err := f.gen.resolve()
	if err != nil {
		return pipeline.EditOptions{}, err
	}
	model, segModel := f.model, f.segModel
	vae, err := f.gen.pickModels(f.data, &model, &segModel)
	if err != nil {
		return pipeline.EditOptions{}, err
	}
	o := f.o
	o.SD = pipeline.ModelRef{Path: model, VAE: vae, DType: r.dtype, Backend: r.backend}
	o.Segment.Model, o.Segment.Classes = pipeline.ModelRef{Path: segModel}, f.classes
	o.Prompt, o.NegativePrompt, o.Steps, o.CFGScale = f.gen.prompt, f.gen.negative, f.gen.steps, f.gen.cfg
	o.Seed, o.Sampler = r.seed, r.sampler
	return o, nil
}

func newEditCommand() *cobra.Command {
	return newFlaggedCommand("edit IMAGE --prompt TEXT",
		"keep the subject of a photo and repaint the rest from a prompt; writes a run folder", cobra.ExactArgs(1), &editFlags{})
}

func (f *editFlags) run(cmd *cobra.Command, args []string) error {
	ef, image, stdout, stderr := &f.engine, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr()
	o, err := f.options()
	if err != nil {
		return err
	}
	input, err := readInput(image)
	if err != nil {
		return err
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	if o.SD.Path == "" || o.Segment.Model.Path == "" {
		sd, seg, err := demoModels(lib, f.data, stderr)
		if err != nil {
			return err
		}
		if o.SD.Path == "" {
			o.SD.Path = sd
		}
		if o.Segment.Model.Path == "" {
			o.Segment.Model.Path = seg
		}
	}
	runs, err := pipeline.OpenRuns(filepath.Join(f.data, "runs"), pipeline.RunsOptions{Logger: ef.log})
	if err != nil {
		return err
	}
	e := newRunner(lib, f.data, "", runs, ef.log)
	defer e.Cache.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	bar := newProgressBar(stderr)
	o.OnStep = bar.update
	res, err := e.Edit(ctx, input, o)
	bar.done()
	if err != nil {
		return err
	}
	if f.json {
		return json.NewEncoder(stdout).Encode(map[string]any{"run": res.RunID, "dir": res.Dir, "subject_iou": res.IoU, "params": res.Params})
	}
	fmt.Fprintf(stdout, "%s\n(subject preserved: IoU %.3f; seed %d)\n", res.Dir, res.IoU, o.Seed)
	return nil
}
