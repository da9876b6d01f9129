package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// serveFlags are serve's flags.
type serveFlags struct {
	engine                                    engineFlags
	addr, data, model, segModel, dtype, token string
	origins                                   []string
	concurrency, maxQueue, maxSteps, maxSide  int
	retention, grace                          time.Duration
	cancelOnShutdown                          bool
}

func newServeCommand() *cobra.Command {
	return newFlaggedCommand("serve", "serve the HTTP + websocket API and the page (127.0.0.1:7860)", cobra.NoArgs, &serveFlags{})
}

func (f *serveFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.addr, "addr", "127.0.0.1:7860", "address to listen on (loopback by default)")
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder: runs/, cache/ and the demo models")
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model (default: the tiny demo model)")
	fs.StringVar(&f.segModel, "seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	fs.StringVar(&f.dtype, "dtype", "auto", "weights dtype: auto, f32, f16, bf16")
	fs.StringVar(&f.token, "token", os.Getenv("STEPWISE_TOKEN"), "require this bearer token ($STEPWISE_TOKEN)")
	fs.StringSliceVar(&f.origins, "allow-origin", nil, "comma-separated origins whose pages may use the API (the server's own always may)")
	fs.IntVar(&f.concurrency, "concurrency", 1, "jobs running at once on the device")
	fs.IntVar(&f.maxQueue, "max-queue", 64, "jobs waiting at most")
	fs.IntVar(&f.maxSteps, "max-steps", 150, "steps a job may ask for")
	fs.IntVar(&f.maxSide, "max-size", 2048, "width or height a job may ask for")
	fs.DurationVar(&f.retention, "retention", pipeline.DefaultRetention, "how long run folders are kept")
	fs.BoolVar(&f.cancelOnShutdown, "cancel-on-shutdown", false, "cancel running jobs on shutdown instead of letting them finish")
	fs.DurationVar(&f.grace, "shutdown-grace", 2*time.Minute, "how long shutdown waits for running jobs")
	_ = cmd.MarkFlagDirname("data")
	completeDTypes(cmd, "dtype")
}

func (f *serveFlags) run(cmd *cobra.Command, _ []string) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	dtype, err := binding.ParseDType(f.dtype)
	if err != nil {
		return err
	}
	lib, err := f.engine.load(stderr)
	if err != nil {
		return err
	}
	lg := f.engine.log
	model, segModel := f.model, f.segModel
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
	engine := newEngine(lib, f.data, "", runs, lg)
	defer engine.Cache.Close()
	var allowed []string
	for _, o := range f.origins {
		if o = strings.TrimSpace(o); o != "" {
			allowed = append(allowed, o)
		}
	}
	srv := server.New(server.Config{
		Model: model, SegModel: segModel, DType: dtype, Token: f.token, AllowedOrigins: allowed,
		Concurrency: f.concurrency, MaxQueue: f.maxQueue, MaxSteps: f.maxSteps, MaxSide: f.maxSide,
		CancelOnShutdown: f.cancelOnShutdown, Logger: lg,
	}, engine)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runs.StartJanitor(ctx, time.Hour)
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
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
