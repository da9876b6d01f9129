package main

import (
	"flag"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
)

// genFlags are the generation flags generate and edit share.
type genFlags struct {
	prompt, negative, sampler, dtype string
	steps                            int
	cfg                              float64
	seed                             int64
}

func (g *genFlags) register(fs *flag.FlagSet, promptHelp, defaultSampler string) {
	fs.StringVar(&g.prompt, "prompt", "", promptHelp)
	fs.StringVar(&g.negative, "negative-prompt", "", "what to avoid")
	fs.IntVar(&g.steps, "steps", 20, "denoising steps")
	fs.Float64Var(&g.cfg, "cfg-scale", 7.5, "classifier-free guidance scale (<= 1 disables guidance)")
	fs.Int64Var(&g.seed, "seed", -1, "random seed (-1: pick one)")
	fs.StringVar(&g.sampler, "sampler", defaultSampler, "sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm (or A1111 names)")
	fs.StringVar(&g.dtype, "dtype", "auto", "weights dtype: auto, f32, f16, bf16")
}

// resolve parses the sampler and dtype and picks a seed when none was given.
func (g *genFlags) resolve() (binding.Sampler, binding.DType, uint64, error) {
	sampler, err := binding.ParseSampler(g.sampler)
	if err != nil {
		return 0, 0, 0, err
	}
	dtype, err := binding.ParseDType(g.dtype)
	if err != nil {
		return 0, 0, 0, err
	}
	seed := uint64(g.seed)
	if g.seed < 0 {
		seed = uint64(time.Now().UnixNano()) & (1<<32 - 1)
	}
	return sampler, dtype, seed, nil
}
