package pipeline_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// gpuLoader is a loader on a machine whose selected device is a GPU: the seam
// where a backend's default device shows. It loads nothing.
type gpuLoader struct{ unavailable error }

func (gpuLoader) Device(name string) (binding.Device, error) {
	switch name {
	case "", "cuda:0":
		return binding.Device{Kind: binding.CUDA, ID: "cuda:0"}, nil
	case "cpu":
		return binding.Device{Kind: binding.CPU, ID: "cpu"}, nil
	}
	return binding.Device{}, binding.ErrDevice
}

func (gpuLoader) Load(modelcache.Key) (modelcache.Model, error) {
	return nil, fmt.Errorf("%w: this loader loads nothing", binding.ErrUnsupported)
}

func (gpuLoader) Backends() []binding.BackendStatus { return nil }

func (l gpuLoader) BackendAvailable(b binding.Backend) error {
	if b == binding.BackendSDCPP {
		return l.unavailable
	}
	return nil
}

func TestResolveModelTakesTheBackend(t *testing.T) {
	runner := func(l gpuLoader) *pipeline.Runner {
		c := modelcache.New(l, modelcache.Options{Budget: -1})
		t.Cleanup(c.Close)
		return &pipeline.Runner{Cache: c, ConvertDir: t.TempDir()}
	}
	r := runner(gpuLoader{})
	sd, seg := t.TempDir(), t.TempDir()+"/seg.safetensors"
	require.NoError(t, os.WriteFile(seg, nil, 0o644))
	torch, err := r.ResolveModel(modelcache.KindSD, pipeline.ModelRef{Path: sd})
	require.NoError(t, err)
	assert.Equal(t, modelcache.Key{Kind: modelcache.KindSD, Path: sd, Device: "cuda:0", DType: binding.F16}, torch)

	sdcpp, err := r.ResolveModel(modelcache.KindSD, pipeline.ModelRef{Path: sd, Backend: binding.BackendSDCPP})
	require.NoError(t, err)
	assert.Equal(t, modelcache.Key{Kind: modelcache.KindSD, Path: sd, Device: "cpu", DType: binding.F32,
		Backend: binding.BackendSDCPP}, sdcpp, "sdcpp runs on the cpu when no device is named")

	_, err = r.ResolveModel(modelcache.KindSeg, pipeline.ModelRef{Path: seg, Backend: binding.BackendSDCPP})
	assert.ErrorIs(t, err, binding.ErrInvalidArgument, "segmentation has no backend to choose")

	missing := fmt.Errorf("%w: not built in", binding.ErrUnsupported)
	_, err = runner(gpuLoader{unavailable: missing}).ResolveModel(modelcache.KindSD,
		pipeline.ModelRef{Path: sd, Backend: binding.BackendSDCPP})
	assert.ErrorIs(t, err, missing)
}
