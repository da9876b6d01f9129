package main

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// genFlags are the generation flags generate and edit share; their defaults
// are the pipeline's.
type genFlags struct {
	prompt, negative, sampler, dtype string
	steps                            int
	cfg                              float32
	seed                             int64
}

func (g *genFlags) register(cmd *cobra.Command, promptHelp string) {
	fs := cmd.Flags()
	fs.StringVar(&g.prompt, "prompt", "", promptHelp+" (required)")
	fs.StringVar(&g.negative, "negative-prompt", "", "what to avoid")
	fs.IntVar(&g.steps, "steps", pipeline.DefaultSteps, "denoising steps")
	fs.Float32Var(&g.cfg, "cfg-scale", pipeline.DefaultCFGScale, "classifier-free guidance scale (<= 1 disables guidance)")
	fs.Int64Var(&g.seed, "seed", -1, "random seed (-1: pick one)")
	fs.StringVar(&g.sampler, "sampler", pipeline.DefaultSampler.String(), "sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm (or A1111 names)")
	fs.StringVar(&g.dtype, "dtype", "auto", "weights dtype: auto, f32, f16, bf16")
	_ = cmd.MarkFlagRequired("prompt")
	completeSamplers(cmd, "sampler")
	completeDTypes(cmd, "dtype")
}

// resolved is what genFlags say, parsed.
type resolved struct {
	sampler binding.Sampler
	dtype   binding.DType
	seed    uint64
}

// resolve parses the sampler and dtype and picks a seed when none was given.
func (g *genFlags) resolve() (resolved, error) {
	sampler, err := binding.ParseSampler(g.sampler)
	if err != nil {
		return resolved{}, err
	}
	dtype, err := binding.ParseDType(g.dtype)
	if err != nil {
		return resolved{}, err
	}
	seed := uint64(g.seed)
	if g.seed < 0 {
		seed = uint64(time.Now().UnixNano()) & (1<<32 - 1)
	}
	return resolved{sampler: sampler, dtype: dtype, seed: seed}, nil
}
