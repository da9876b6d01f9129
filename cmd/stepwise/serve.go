package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/jobbus"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

// serveFlags are serve's flags.
type serveFlags struct {
	engine                                        engineFlags
	nats                                          natsFlags
	workers, maxCrashes                           int
	ackWait                                       time.Duration
	addr, data, model, modelsDir, vae, segModel   string
	dtype, backend, token                         string
	origins, hosts                                []string
	concurrency, maxQueue, maxSteps, maxSide      int
	maxConns, maxWebsockets, maxPrompt, maxPixels int
	keepJobs, maxBatch                            int
	maxBody                                       int64
	retention, grace, readTimeout                 time.Duration
	cancelOnShutdown                              bool
}

func newServeCommand() *cobra.Command {
	return newFlaggedCommand("serve", "serve the HTTP + websocket API and the page (127.0.0.1:7860); the engine runs in worker processes", cobra.NoArgs, &serveFlags{})
}

func (f *serveFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	f.nats.register(cmd, "external NATS server URL: use its queue instead of an embedded one, and start no local workers")
	fs := cmd.Flags()
	fs.IntVar(&f.workers, "workers", autoWorkers, "local worker processes to run and restart, with the embedded NATS (-1: one per GPU found, else one; 0: none)")
	fs.IntVar(&f.maxCrashes, "max-crashes", server.DefaultMaxCrashes, "times a job may end its worker before it fails instead of running again (local workers)")
	fs.DurationVar(&f.ackWait, "ack-wait", jobbus.DefaultAckWait, "how long a job may go without its worker's word before another worker gets it")
	fs.StringVar(&f.addr, "addr", "127.0.0.1:7860", "address to listen on (loopback by default)")
	fs.StringVar(&f.data, "data", defaultDataDir(), "data folder: runs/, cache/ and the demo models")
	fs.StringVar(&f.model, "model", "", "Stable Diffusion model: a path, or a name in --models-dir (default: the folder's first, else the tiny demo model)")
	fs.StringVar(&f.modelsDir, "models-dir", "", "folder of checkpoints (diffusers folders, .safetensors, .ckpt, VAEs) that requests may choose from")
	fs.StringVar(&f.vae, "vae", "", "VAE replacing the models' own: a path, or a name in --models-dir")
	fs.StringVar(&f.segModel, "seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	fs.StringVar(&f.dtype, "dtype", "auto", dtypeHelp)
	fs.StringVar(&f.backend, "backend", binding.BackendLibtorch.String(), backendHelp+"; the default of jobs that name none")
	fs.StringVar(&f.token, "token", os.Getenv("STEPWISE_TOKEN"), "require this bearer token ($STEPWISE_TOKEN)")
	fs.StringSliceVar(&f.origins, "allow-origin", nil, "comma-separated origins whose pages may use the API (the server's own always may)")
	d := server.DefaultConfig() // the limits' defaults live with the server
	fs.IntVar(&f.concurrency, "concurrency", 1, "jobs running at once in each local worker")
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
	completeBackends(cmd, "backend")
}

func (f *serveFlags) run(cmd *cobra.Command, _ []string) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	model, vae, segModel := f.model, f.vae, f.segModel
	dtype, err := binding.ParseDType(f.dtype)
	if err != nil {
		return err
	}
	// The default backend is checked where it runs: a worker announces the
	// backends it can load, and jobs asking for one no worker has are refused.
	backend, err := binding.ParseBackend(f.backend)
	if err != nil {
		return err
	}
	lg := f.engine.logger(stderr)
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
		// The gateway never loads the engine: a child process makes the demo models.
		sd, seg, err := f.demoModels(cmd.Context(), stderr)
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

	opts := f.nats.options("stepwise serve")
	embedded := opts.URL == ""
	if embedded {
		ns, err := jobbus.StartEmbedded(f.data)
		if err != nil {
			return err
		}
		defer ns.Shutdown()
		opts = ns.Options
		opts.Name = "stepwise serve"
	}
	bus, err := jobbus.Connect(opts)
	if err != nil {
		return err
	}
	defer bus.Close()
	srv, err := server.New(server.Config{
		Model: model, SegModel: segModel, VAE: vae, Catalog: cat, DType: dtype, Backend: backend,
		Token: f.token, AllowedOrigins: splitList(f.origins), AllowedHosts: splitList(f.hosts),
		MaxQueue: f.maxQueue, MaxSteps: f.maxSteps, MaxSide: f.maxSide,
		MaxConns: f.maxConns, MaxWebsockets: f.maxWebsockets, MaxPromptBytes: f.maxPrompt, MaxPixels: f.maxPixels,
		MaxBodyBytes: f.maxBody, ReadTimeout: f.readTimeout, KeepJobs: f.keepJobs, MaxBatch: f.maxBatch,
		CancelOnShutdown: f.cancelOnShutdown, Runs: runs, ConvertDir: filepath.Join(f.data, "cache"),
		KeepQueuedOnShutdown: !embedded, Version: version,
		Bus: jobbus.SetupOptions{AckWait: f.ackWait, Retention: f.retention}, Logger: lg,
	}, bus)
	if err != nil {
		return err
	}
	defer srv.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runs.StartJanitor(ctx, time.Hour)
	ln, err := srv.Listen(ctx, f.addr)
	if err != nil {
		return err
	}
	// Local workers live until the gateway has finished with them.
	wctx, stopWorkers := context.WithCancel(context.Background())
	supervised := make(chan struct{})
	var devices []string
	if embedded {
		devices = planWorkers(f.workers, f.engine.device, func() []string { return f.probeGPUs(ctx, lg) })
	}
	if len(devices) > 0 {
		sup, err := f.supervisor(opts, devices, stderr, lg)
		if err != nil {
			stopWorkers()
			return err
		}
		go func() { sup.run(wctx); close(supervised) }()
	} else {
		close(supervised)
	}
	defer func() { stopWorkers(); <-supervised }()

	hs := srv.HTTPServer()
	where := "NATS " + opts.URL
	if embedded {
		where = fmt.Sprintf("%d local worker(s), embedded NATS %s", len(devices), opts.URL)
	}
	fmt.Fprintf(stdout, "stepwise %s serving on http://%s (%s, model %s)\n", version, ln.Addr(), where, model)
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

// engineArgs are the engine flags given to this command, for its children.
func (f *serveFlags) engineArgs() []string {
	var args []string
	if f.engine.lib != "" {
		args = append(args, "--lib", f.engine.lib)
	}
	if f.engine.device != "" {
		args = append(args, "--device", f.engine.device)
	}
	if f.engine.threads > 0 {
		args = append(args, "--threads", strconv.Itoa(f.engine.threads))
	}
	if f.engine.verbose {
		args = append(args, "--verbose")
	}
	return args
}

// supervisor runs the local workers on the embedded NATS.
func (f *serveFlags) supervisor(opts jobbus.ConnectOptions, devices []string, stderr io.Writer, lg *slog.Logger) (*supervisor, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this binary to start workers: %w", err)
	}
	args := append([]string{"worker", "--nats", opts.URL, "--data", f.data, "--retention", f.retention.String(),
		"--max-crashes", strconv.Itoa(f.maxCrashes), "--concurrency", strconv.Itoa(f.concurrency),
		"--shutdown-grace", f.grace.String()}, f.engineArgs()...)
	return &supervisor{exe: exe, args: args, devices: devices, grace: f.grace + 10*time.Second, stderr: stderr, log: lg,
		env: []string{natsUserEnv + "=" + opts.User, natsPasswordEnv + "=" + opts.Password}}, nil
}

// demoModels returns the tiny random-weight models under data/models, made
// the first time by a child process (`stepwise models make-tiny`), so a fault
// of the engine never touches the gateway.
func (f *serveFlags) demoModels(ctx context.Context, stderr io.Writer) (sd, seg string, err error) {
	dir, sd, seg, ok := demoModelPaths(f.data)
	if ok {
		return sd, seg, nil
	}
	fmt.Fprintf(stderr, "making the tiny demo models in %s (random weights: the images are noise)\n", dir)
	exe, err := os.Executable()
	if err != nil {
		return "", "", fmt.Errorf("find this binary to make the demo models: %w", err)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	child := exec.CommandContext(ctx, exe, append([]string{"models", "make-tiny", dir}, f.engineArgs()...)...)
	child.Stderr = stderr
	if err := child.Run(); err != nil {
		return "", "", fmt.Errorf("make the demo models (stepwise models make-tiny): %s", exitReason(err))
	}
	return sd, seg, nil
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
