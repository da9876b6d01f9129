package main

import (
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/internal/regfile"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// genFlags are the generation flags generate and edit share; their defaults
// are the pipeline's.
type genFlags struct {
	prompt, negative, sampler, dtype string
	backend                          string
	modelsDir, vae                   string
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
	fs.StringVar(&g.dtype, "dtype", "auto", dtypeHelp)
	fs.StringVar(&g.backend, "backend", binding.BackendLibtorch.String(), backendHelp)
	fs.StringVar(&g.modelsDir, "models-dir", "", "folder of checkpoints: --model, --vae (and --seg-model) may name one of them")
	fs.StringVar(&g.vae, "vae", "", "VAE replacing the model's own: a .safetensors file or diffusers VAE folder, or a name in --models-dir")
	_ = cmd.MarkFlagDirname("models-dir")
	_ = cmd.MarkFlagRequired("prompt")
	completeSamplers(cmd, "sampler")
	completeDTypes(cmd, "dtype")
	completeBackends(cmd, "backend")
}

// pickModels resolves model names against --models-dir (when given): each
// pointer holds a path, a name in the folder, or "" (for a checkpoint or a
// segmentation model: the folder's first). data holds the hash cache.
func (g *genFlags) pickModels(data string, sd, seg *string) (vae string, err error) {
	if g.modelsDir == "" {
		return g.vae, nil
	}
	cat, err := catalog.Open(g.modelsDir, filepath.Join(data, "cache"))
	if err != nil {
		return "", err
	}
	if *sd, err = pickModel(cat, catalog.KindCheckpoint, *sd); err != nil {
		return "", err
	}
	if seg != nil {
		if *seg, err = pickModel(cat, catalog.KindSeg, *seg); err != nil {
			return "", err
		}
	}
	return pickModel(cat, catalog.KindVAE, g.vae)
}

// maxInputFileBytes bounds an image file the CLI reads (the pixel limit
// applies after).
const maxInputFileBytes = 512 << 20

// readInput reads a file named on the command line, refusing FIFOs and
// devices rather than blocking on them.
func readInput(path string) ([]byte, error) { return regfile.ReadFile(path, maxInputFileBytes) }

// resolved is what genFlags say, parsed.
type resolved struct {
	sampler binding.Sampler
	dtype   binding.DType
	backend binding.Backend
	seed    uint64
}

// resolve parses the sampler and dtype and picks a seed when none was given.
func (g *genFlags) resolve() (resolved, error) {
	sampler, err := server.ParseSampler(g.sampler)
	if err != nil {
		return resolved{}, err
	}
	dtype, err := binding.ParseDType(g.dtype)
	if err != nil {
		return resolved{}, err
	}
	backend, err := binding.ParseBackend(g.backend)
	if err != nil {
		return resolved{}, err
	}
	seed := uint64(g.seed)
	if g.seed < 0 {
		seed = uint64(time.Now().UnixNano()) & (1<<32 - 1)
	}
	return resolved{sampler: sampler, dtype: dtype, backend: backend, seed: seed}, nil
}
