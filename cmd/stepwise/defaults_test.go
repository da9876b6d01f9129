package main

import (
	"testing"

	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// A field left out of a CLI call and the same field left out of a server job
// get the same value: both are the pipeline's defaults.
func TestLeftOutFieldsMeanTheSameInTheCLIAndTheServer(t *testing.T) {
	job := server.DefaultParams()
	jobSampler, err := server.ParseSampler(job.SamplerName)
	require.NoError(t, err)

	var g generateFlags
	cmd := &cobra.Command{}
	g.register(cmd)
	require.NoError(t, cmd.ParseFlags([]string{"--model", "m", "--prompt", "x", "--out", "o.png"}))
	gen, err := g.options()
	require.NoError(t, err)

	var e editFlags
	cmd = &cobra.Command{}
	e.register(cmd)
	require.NoError(t, cmd.ParseFlags([]string{"--prompt", "x"}))
	edit, err := e.options()
	require.NoError(t, err)

	tests := []struct {
		field          string
		server, cli    any
		editCLI        any
		pipelineFilled bool // the server leaves it 0 for the pipeline to fill
	}{
		{"steps", job.Steps, gen.Steps, edit.Steps, false},
		{"cfg_scale", job.CFGScale, gen.CFGScale, edit.CFGScale, false},
		{"sampler", jobSampler, gen.Sampler, edit.Sampler, false},
		{"mask_blur", job.MaskBlur, gen.MaskBlur, edit.MaskBlur, false},
		{"batch_size", job.BatchSize, gen.BatchSize, nil, false},
		{"preview_every", job.PreviewEvery, gen.PreviewEvery, edit.PreviewEvery, false},
		{"denoising_strength", job.DenoisingStrength, gen.Strength, nil, true},
		{"width", job.Width, gen.Width, nil, true},
		{"height", job.Height, gen.Height, nil, true},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.server, tt.cli, "generate: %s", tt.field)
		if tt.editCLI != nil {
			assert.Equal(t, tt.server, tt.editCLI, "edit: %s", tt.field)
		}
		if tt.pipelineFilled {
			assert.Zero(t, tt.server, "%s: left to the pipeline", tt.field)
		}
	}
	// What the server leaves to the pipeline, edit's flags state outright.
	assert.Zero(t, job.WorkingSize)
	assert.Equal(t, pipeline.DefaultSize, edit.WorkingSize)
	assert.Zero(t, job.SegmentScale)
	assert.Equal(t, pipeline.DefaultSegmentScale, edit.Segment.Scale)
}
