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
	engine                                             engineFlags
	addr, data, model, segModel, dtype, token, origins *string
	concurrency, maxQueue, maxSteps, maxSide           *int
	retention, grace                                   *time.Duration
	cancelOnShutdown                                   *bool
}

func newServeCommand() *cobra.Command {
	return newFlaggedCommand("serve", "serve the HTTP + websocket API and the page (127.0.0.1:7860)", cobra.NoArgs, &serveFlags{})
}

func (f *serveFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	f.addr = fs.String("addr", "127.0.0.1:7860", "address to listen on (loopback by default)")
	f.data = fs.String("data", defaultDataDir(), "data folder: runs/, cache/ and the demo models")
	f.model = fs.String("model", "", "Stable Diffusion model (default: the tiny demo model)")
	f.segModel = fs.String("seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	f.dtype = fs.String("dtype", "auto", "weights dtype: auto, f32, f16, bf16")
	f.token = fs.String("token", os.Getenv("STEPWISE_TOKEN"), "require this bearer token ($STEPWISE_TOKEN)")
	f.origins = fs.String("allow-origin", "", "comma-separated origins whose pages may use the API (the server's own always may)")
	f.concurrency = fs.Int("concurrency", 1, "jobs running at once on the device")
	f.maxQueue = fs.Int("max-queue", 64, "jobs waiting at most")
	f.maxSteps = fs.Int("max-steps", 150, "steps a job may ask for")
	f.maxSide = fs.Int("max-size", 2048, "width or height a job may ask for")
	f.retention = fs.Duration("retention", pipeline.DefaultRetention, "how long run folders are kept")
	f.cancelOnShutdown = fs.Bool("cancel-on-shutdown", false, "cancel running jobs on shutdown instead of letting them finish")
	f.grace = fs.Duration("shutdown-grace", 2*time.Minute, "how long shutdown waits for running jobs")
	_ = cmd.MarkFlagDirname("data")
	completeDTypes(cmd, "dtype")
}

func (f *serveFlags) run(cmd *cobra.Command, _ []string) error {
	ef, stdout, stderr := &f.engine, cmd.OutOrStdout(), cmd.ErrOrStderr()
	addr, data, model, segModel, dtypeName, token, origins := f.addr, f.data, f.model, f.segModel, f.dtype, f.token, f.origins
	concurrency, maxQueue, maxSteps, maxSide := f.concurrency, f.maxQueue, f.maxSteps, f.maxSide
	retention, cancelOnShutdown, grace := f.retention, f.cancelOnShutdown, f.grace
	dtype, err := binding.ParseDType(*dtypeName)
	if err != nil {
		return err
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	lg := ef.log
	if *model == "" || *segModel == "" {
		sd, seg, err := demoModels(lib, *data, stderr)
		if err != nil {
			return err
		}
		if *model == "" {
			*model = sd
			lg.Warn("no --model given: serving the tiny random-weight demo model (its images are noise)", "model", sd)
		}
		if *segModel == "" {
			*segModel = seg
		}
	}
	runs, err := pipeline.OpenRuns(filepath.Join(*data, "runs"), pipeline.RunsOptions{Retention: *retention, Logger: lg})
	if err != nil {
		return err
	}
	engine := newEngine(lib, *data, "", runs, lg)
	defer engine.Cache.Close()
	var allowed []string
	for _, o := range strings.Split(*origins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			allowed = append(allowed, o)
		}
	}
	srv := server.New(server.Config{
		Model: *model, SegModel: *segModel, DType: dtype, Token: *token, AllowedOrigins: allowed,
		Concurrency: *concurrency, MaxQueue: *maxQueue, MaxSteps: *maxSteps, MaxSide: *maxSide,
		CancelOnShutdown: *cancelOnShutdown, Logger: lg,
	}, engine)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runs.StartJanitor(ctx, time.Hour)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	fmt.Fprintf(stdout, "stepwise %s serving on http://%s (device %s, model %s)\n", version, ln.Addr(), lib.Device().ID, *model)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	fmt.Fprintln(stdout, "shutting down: no new jobs; waiting for running ones")
	sctx, cancel := context.WithTimeout(context.Background(), *grace)
	defer cancel()
	jobErr := srv.Shutdown(sctx)
	hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer hcancel()
	if err := hs.Shutdown(hctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return jobErr
}
