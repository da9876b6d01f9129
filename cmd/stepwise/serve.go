package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/catalog"
	"github.com/stepwise-sd/stepwise/pipeline"
	"github.com/stepwise-sd/stepwise/server"
)

func runServe(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", stderr)
	var ef engineFlags
	ef.register(fs)
	addr := fs.String("addr", "127.0.0.1:7860", "address to listen on (loopback by default)")
	data := fs.String("data", defaultDataDir(), "data folder: runs/, cache/ and the demo models")
	model := fs.String("model", "", "Stable Diffusion model: a path, or a name in --models-dir (default: the folder's first, else the tiny demo model)")
	modelsDir := fs.String("models-dir", "", "folder of checkpoints (diffusers folders, .safetensors, .ckpt, VAEs) that requests may choose from")
	vae := fs.String("vae", "", "VAE replacing the models' own: a path, or a name in --models-dir")
	segModel := fs.String("seg-model", "", "segmentation U-Net (default: the tiny demo model)")
	dtypeName := fs.String("dtype", "auto", "weights dtype: auto, f32, f16, bf16")
	token := fs.String("token", os.Getenv("STEPWISE_TOKEN"), "require this bearer token ($STEPWISE_TOKEN)")
	origins := fs.String("allow-origin", "", "comma-separated origins whose pages may use the API (the server's own always may)")
	concurrency := fs.Int("concurrency", 1, "jobs running at once on the device")
	maxQueue := fs.Int("max-queue", 64, "jobs waiting at most")
	maxSteps := fs.Int("max-steps", 150, "steps a job may ask for")
	maxSide := fs.Int("max-size", 2048, "width or height a job may ask for")
	retention := fs.Duration("retention", pipeline.DefaultRetention, "how long run folders are kept")
	cancelOnShutdown := fs.Bool("cancel-on-shutdown", false, "cancel running jobs on shutdown instead of letting them finish")
	grace := fs.Duration("shutdown-grace", 2*time.Minute, "how long shutdown waits for running jobs")
	hosts := fs.String("allow-host", "", "comma-separated Host names the server answers to besides IP addresses and localhost (\"*\": any)")
	maxConns := fs.Int("max-conns", 256, "open HTTP connections at most")
	maxWebsockets := fs.Int("max-websockets", 128, "open websocket connections at most")
	maxPrompt := fs.Int("max-prompt", 4096, "bytes of a prompt or negative prompt")
	maxPixels := fs.Int("max-pixels", 16<<20, "pixels of an uploaded image")
	maxBody := fs.Int64("max-body", 32<<20, "bytes of a request body")
	readTimeout := fs.Duration("read-timeout", time.Minute, "time to read one request, body included")
	keepJobs := fs.Int("keep-jobs", 200, "finished jobs kept listed by /v1/jobs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dtype, err := binding.ParseDType(*dtypeName)
	if err != nil {
		return err
	}
	lib, err := ef.load(stderr)
	if err != nil {
		return err
	}
	lg := ef.log
	var cat *catalog.Catalog
	if *modelsDir != "" {
		if cat, err = catalog.Open(*modelsDir, filepath.Join(*data, "cache")); err != nil {
			return err
		}
		if *model, err = pickModel(cat, catalog.KindCheckpoint, *model); err != nil {
			return err
		}
		if *vae, err = pickModel(cat, catalog.KindVAE, *vae); err != nil {
			return err
		}
		if *segModel, err = pickModel(cat, catalog.KindSeg, *segModel); err != nil {
			return err
		}
	}
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
	engine := &pipeline.Engine{Cache: binding.NewCache(lib, binding.CacheOptions{Logger: lg}), Runs: runs,
		ConvertDir: filepath.Join(*data, "cache"), Version: version}
	defer engine.Cache.Close()
	srv := server.New(server.Config{
		Model: *model, SegModel: *segModel, VAE: *vae, Catalog: cat, DType: dtype, Token: *token,
		AllowedOrigins: splitList(*origins), AllowedHosts: splitList(*hosts),
		Concurrency: *concurrency, MaxQueue: *maxQueue, MaxSteps: *maxSteps, MaxSide: *maxSide,
		MaxConns: *maxConns, MaxWebsockets: *maxWebsockets, MaxPromptBytes: *maxPrompt, MaxPixels: *maxPixels,
		MaxBodyBytes: *maxBody, ReadTimeout: *readTimeout, KeepJobs: *keepJobs,
		CancelOnShutdown: *cancelOnShutdown, Logger: lg,
	}, engine)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runs.StartJanitor(ctx, time.Hour)
	ln, err := srv.Listen(ctx, *addr)
	if err != nil {
		return err
	}
	hs := srv.HTTPServer()
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

// splitList splits a comma-separated flag value, dropping empty entries.
func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
