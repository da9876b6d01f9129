package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// serveFlags are serve's flags.
type serveFlags struct {
	engine                                        engineFlags
	addr, data, model, modelsDir, vae, segModel   string
	dtype, token                                  string
	origins, hosts                                []string
	concurrency, maxQueue, maxSteps, maxSide      int
	maxConns, maxWebsockets, maxPrompt, maxPixels int
	keepJobs, maxBatch                            int
	maxBody                                       int64
	retention, grace, readTimeout                 time.Duration
	cancelOnShutdown                              bool
}

func newServeCommand() *cobra.Command {
	return newFlaggedCommand("serve", "serve the HTTP + websocket API and the page (127.0.0.1:7860)", cobra.NoArgs, &serveFlags{})
}

func (f *serveFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.addr, "addr", "127.0.0.1:7860", "address to listen on (loopback by default)")
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder: runs/, cache/ and the demo models")
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model: a path, or a name in --models-dir (default: the folder's first, else the tiny demo model)")
	fs.StringVar(&f.modelsDir, "models-dir", "", "folder of checkpoints (diffusers folders, .safetensors, .ckpt, VAEs) that requests may choose from")
	fs.StringVar(&f.vae, "vae", "", "VAE replacing the models' own: a path, or a name in --models-dir")
	fs.StringVar(&f.segModel, "seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	fs.StringVar(&f.dtype, "dtype", "auto", "weights dtype: auto, f32, f16, bf16, int8 (cpu: the UNet's linear layers in int8)")
	fs.StringVar(&f.token, "token", os.Getenv("STEPWISE_TOKEN"), "require this bearer token ($STEPWISE_TOKEN)")
	fs.StringSliceVar(&f.origins, "allow-origin", nil, "comma-separated origins whose pages may use the API (the server's own always may)")
	d := server.DefaultConfig() // the limits' defaults live with the server
	fs.IntVar(&f.concurrency, "concurrency", d.Concurrency, "jobs running at once on the device")
	fs.IntVar(&f.maxQueue, "max-queue", d.MaxQueue, "jobs waiting at most")
	fs.IntVar(&f.maxSteps, "max-steps", d.MaxSteps, "steps a job may ask for")
	fs.IntVar(&f.maxSide, "max-size", d.MaxSide, "width or height a job may ask for")
	fs.DurationVar(&f.retention, "retention", pipeline.DefaultRetention, "how long run folders are kept")
	fs.BoolVar(&f.cancelOnShutdown, "cancel-on-shutdown", false, "cancel running jobs on shutdown instead of letting them finish")
	fs.DurationVar(&f.grace, "shutdown-grace", 2*time.Minute, "how long shutdown waits for running jobs")
	fs.StringSliceVar(&f.hosts, "allow-host", nil, "comma-separated Host names the server answers to besides IP addresses and localhost (\"*\": any)")
	fs.IntVar(&f.maxConns, "max-conns", d.MaxConns, "open HTTP connections at most")
	fs.IntVar(&f.maxWebsockets, "max-websockets", d.MaxWebsockets, "open websocket connections at most")
	fs.IntVar(&f.maxPrompt, "max-prompt", d.MaxPromptBytes, "bytes of a prompt or negative prompt")
	fs.IntVar(&f.maxPixels, "max-pixels", d.MaxPixels, "pixels of an uploaded image")
	fs.Int64Var(&f.maxBody, "max-body", d.MaxBodyBytes, "bytes of a request body")
	fs.DurationVar(&f.readTimeout, "read-timeout", d.ReadTimeout, "time to read one request, body included")
	fs.IntVar(&f.keepJobs, "keep-jobs", d.KeepJobs, "finished jobs kept listed by /v1/jobs")
	fs.IntVar(&f.maxBatch, "max-batch", d.MaxBatch, "images a job may ask for")
	_ = cmd.MarkFlagDirname("data")
	_ = cmd.MarkFlagDirname("models-dir")
	completeDTypes(cmd, "dtype")
}

func (f *serveFlags) run(cmd *cobra.Command, _ []string) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	model, vae, segModel := f.model, f.vae, f.segModel
	dtype, err := binding.ParseDType(f.dtype)
	if err != nil {
		return err
	}
	lib, err := f.engine.load(stderr)
	if err != nil {
		return err
	}
	lg := f.engine.log
	var cat *catalog.Catalog
	if f.modelsDir != "" {
		if cat, err = catalog.Open(f.modelsDir, filepath.Join(f.data, "cache")); err != nil {
			return err
		}
		if model, err = pickModel(cat, catalog.KindCheckpoint, model); err != nil {
			return err
		}
		if vae, err = pickModel(cat, catalog.KindVAE, vae); err != nil {
			return err
		}
		if segModel, err = pickModel(cat, catalog.KindSeg, segModel); err != nil {
			return err
		}
	}
	if model == "" || segModel == "" {
		sd, seg, err := demoModels(lib, f.data, stderr)
		if err != nil {
			return err
		}
		if model == "" {
			model = sd
			lg.Warn("no --model given: serving the tiny random-weight demo model (its images are noise)", "model", sd)
		}
		if segModel == "" {
			segModel = seg
		}
	}
	runs, err := pipeline.OpenRuns(filepath.Join(f.data, "runs"), pipeline.RunsOptions{Retention: f.retention, Logger: lg})
	if err != nil {
		return err
	}
	runner := newRunner(lib, f.data, "", runs, lg)
	defer runner.Cache.Close()
	srv := server.New(server.Config{
		Model: model, SegModel: segModel, VAE: vae, Catalog: cat, DType: dtype, Token: f.token,
		AllowedOrigins: splitList(f.origins), AllowedHosts: splitList(f.hosts),
		Concurrency: f.concurrency, MaxQueue: f.maxQueue, MaxSteps: f.maxSteps, MaxSide: f.maxSide,
		MaxConns: f.maxConns, MaxWebsockets: f.maxWebsockets, MaxPromptBytes: f.maxPrompt, MaxPixels: f.maxPixels,
		MaxBodyBytes: f.maxBody, ReadTimeout: f.readTimeout, KeepJobs: f.keepJobs, MaxBatch: f.maxBatch,
		CancelOnShutdown: f.cancelOnShutdown, Logger: lg,
	}, runner)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runs.StartJanitor(ctx, time.Hour)
	ln, err := srv.Listen(ctx, f.addr)
	if err != nil {
		return err
	}
	hs := srv.HTTPServer()
	fmt.Fprintf(stdout, "stepwise %s serving on http://%s (device %s, model %s)\n", version, ln.Addr(), lib.Device().ID, model)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintln(stdout, "shutting down: no new jobs; waiting for running ones")
	sctx, cancel := context.WithTimeout(context.Background(), f.grace)
	defer cancel()
	jobErr := srv.Shutdown(sctx)
	hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer hcancel()
	if err := hs.Shutdown(hctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return jobErr
}

// pickModel resolves a model flag against a models folder: an existing path
// stays, a name is looked up; an empty checkpoint or segmentation flag takes
// the folder's first of its kind (no VAE unless one is named).
func pickModel(cat *catalog.Catalog, kind, flag string) (string, error) {
	if flag != "" {
		if _, err := os.Stat(flag); err == nil {
			return flag, nil
		}
		e, err := cat.Find(kind, flag)
		if err != nil {
			return "", err
		}
		return e.Path, nil
	}
	if kind != catalog.KindVAE {
		if list := cat.List(kind); len(list) > 0 {
			return list[0].Path, nil
		}
	}
	return "", nil
}

// splitList trims the entries of a list flag and drops the empty ones.
func splitList(v []string) []string {
	var out []string
	for _, s := range v {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
