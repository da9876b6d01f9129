package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/modelcache"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// workerFlags are worker's flags.
type workerFlags struct {
	engine                  engineFlags
	nats                    natsFlags
	data, id, model, dtype  string
	maxCrashes, concurrency int
	retention, grace        time.Duration
}

func newWorkerCommand() *cobra.Command {
	return newFlaggedCommand("worker", "run jobs from a gateway's NATS queue on this host's device", cobra.NoArgs, &workerFlags{})
}

func (f *workerFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	f.nats.register(cmd, "NATS server URL of the gateway's queue (required)")
	fs := cmd.Flags()
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder: runs/ and cache/")
	fs.StringVar(&f.id, "id", "", "the worker's name (default: host-pid)")
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model to load at start (jobs name their own)")
	fs.StringVar(&f.dtype, "dtype", "auto", "dtype of the model loaded at start")
	fs.IntVar(&f.maxCrashes, "max-crashes", server.DefaultMaxCrashes, "times a job may end its worker before it fails instead of running again")
	fs.IntVar(&f.concurrency, "concurrency", 1, "jobs running at once on the device")
	fs.DurationVar(&f.retention, "retention", pipeline.DefaultRetention, "how long run folders are kept")
	fs.DurationVar(&f.grace, "shutdown-grace", 2*time.Minute, "how long a stopping worker lets its running jobs finish before handing them back")
	_ = cmd.MarkFlagDirname("data")
	completeDTypes(cmd, "dtype")
}

func (f *workerFlags) run(cmd *cobra.Command, _ []string) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	if f.nats.url == "" {
		return usageError{errors.New("--nats is required: the URL of the gateway's NATS server")}
	}
	lib, err := f.engine.load(stderr)
	if err != nil {
		return err
	}
	lg := f.engine.log
	runs, err := pipeline.OpenRuns(filepath.Join(f.data, "runs"), pipeline.RunsOptions{Retention: f.retention, Logger: lg})
	if err != nil {
		return err
	}
	runner := newRunner(lib, f.data, "", runs, lg)
	defer runner.Cache.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if f.model != "" {
		if err := preload(ctx, runner, f.model, f.dtype); err != nil {
			return err
		}
	}
	bus, err := jobbus.Connect(f.nats.options("stepwise worker"))
	if err != nil {
		return err
	}
	defer bus.Close()
	dev := lib.Device()
	w := server.NewWorker(server.WorkerConfig{ID: f.id, Device: dev.ID, DeviceName: dev.Name,
		Version: version, MaxCrashes: f.maxCrashes, Concurrency: f.concurrency, StopGrace: f.grace, Logger: lg}, runner, bus)
	fmt.Fprintf(stdout, "stepwise %s worker %s on %s (device %s)\n", version, w.ID(), f.nats.url, dev.ID)
	return w.Run(ctx)
}

// preload loads a model into the cache before the worker takes jobs.
func preload(ctx context.Context, runner *pipeline.Runner, model, dtype string) error {
	dt, err := binding.ParseDType(dtype)
	if err != nil {
		return err
	}
	key, err := runner.ResolveModel(modelcache.KindSD, pipeline.ModelRef{Path: model, DType: dt})
	if err != nil {
		return err
	}
	ref, err := runner.Cache.Acquire(ctx, key)
	if err != nil {
		return err
	}
	ref.Release()
	return nil
}
