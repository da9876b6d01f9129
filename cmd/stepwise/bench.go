package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/stepwise-sd/stepwise/binding"
	"github.com/stepwise-sd/stepwise/models"
	"github.com/stepwise-sd/stepwise/pipeline"
)

// benchRow is one measured configuration, or one bench could not measure.
type benchRow struct {
	Model string `json:"model"`
	// Backend is the engine that ran it; absent (libtorch) in rows of
	// benches older than the sdcpp backend.
	Backend     string  `json:"backend,omitempty"`
	Device      string  `json:"device"`
	DType       string  `json:"dtype"`
	Size        int     `json:"size"`
	Steps       int     `json:"steps"`
	CFG         bool    `json:"cfg"`
	LoadSeconds float64 `json:"load_seconds"`
	TextSeconds float64 `json:"text_seconds"`
	StepSeconds float64 `json:"step_seconds"` // median over the timed steps
	StepMin     float64 `json:"step_seconds_min"`
	DecodeSec   float64 `json:"vae_decode_seconds"`
	// PeakRSS is the peak resident memory of the process that measured this
	// dtype alone, up to the end of this row.
	PeakRSS int64  `json:"peak_rss_bytes"`
	Threads int    `json:"threads"`
	Preview string `json:"preview"`
	PID     int    `json:"pid,omitempty"` // the process that measured the row
	// ImageDiffs compare this row's image with the first row measured at its
	// size, and with its own backend's first row there when that is another
	// (every row draws the same prompt and seed). None in the first row.
	ImageDiffs []imageComparison `json:"image_diffs,omitempty"`
	// Skipped says why this backend and dtype were not measured (the backend
	// cannot run that dtype, or is not available); nothing else is set.
	Skipped string `json:"skipped,omitempty"`
}

// imageComparison is how far a row's image is from another row's.
type imageComparison struct {
	Vs         string `json:"vs"`           // the other row's label
	MaxAbsDiff int    `json:"max_abs_diff"` // the largest difference of one 8-bit channel
	// PSNR in dB; absent when the images are identical.
	PSNR *float64 `json:"psnr_db,omitempty"`
}

func (c imageComparison) String() string {
	psnr := "identical"
	if c.PSNR != nil {
		psnr = fmt.Sprintf("%.1f dB", *c.PSNR)
	}
	return fmt.Sprintf("vs %s: %d, %s", c.Vs, c.MaxAbsDiff, psnr)
}

// label names the row's backend and dtype, as "libtorch f32".
func (r benchRow) label() string { return backendName(r.Backend) + " " + r.DType }

// backendName is a row's backend, libtorch for rows that name none.
func backendName(s string) string {
	if s == "" {
		return binding.BackendLibtorch.String()
	}
	return s
}

// inProcessFlag makes bench measure in its own process instead of starting
// one child per backend and dtype; the parent passes it to its children,
// with imagesFlag: the folder the children leave their images in.
const (
	inProcessFlag = "in-process"
	imagesFlag    = "images"
)

// benchFlags are bench's flags.
type benchFlags struct {
	engine                                          engineFlags
	model, tokenizer, cache, sizes, dtypes, preview string
	backends, images                                string
	steps                                           int
	cfg                                             float32
	asJSON, inProcess                               bool
}

func newBenchCommand() *cobra.Command {
	cmd := newFlaggedCommand("bench", "time text encoding, denoising steps and VAE decoding per size, backend and dtype", cobra.NoArgs, &benchFlags{})
	cmd.AddCommand(newBenchCompareCommand(), newBenchMemoryCommand())
	return cmd
}

func (f *benchFlags) register(cmd *cobra.Command) {
	f.engine.register(cmd)
	fs := cmd.Flags()
	fs.StringVar(&f.model, "model", "", "model to time (default: a random-weight SD 1.5-sized model, made once in --cache)")
	fs.StringVar(&f.tokenizer, "tokenizer", "", "tokenizer folder (default: the model's own, else the built-in CLIP vocabulary)")
	fs.StringVar(&f.cache, "cache", filepath.Join(os.TempDir(), "stepwise-bench"), "where the random SD 1.5-sized model is kept")
	fs.StringVar(&f.sizes, "sizes", "256,512", "square image sizes to time")
	fs.StringVar(&f.dtypes, "dtypes", "f32", "weight dtypes to compare, e.g. f32,bf16,q8_0 (each backend and dtype is measured in a process of its own)")
	fs.StringVar(&f.backends, "backends", binding.BackendLibtorch.String(), "backends to compare, e.g. libtorch,sdcpp (a dtype a backend cannot run is skipped with a note)")
	fs.IntVar(&f.steps, "steps", 3, "denoising steps per size (the first is a warm-up and not timed)")
	fs.Float32Var(&f.cfg, "cfg-scale", pipeline.DefaultCFGScale, "guidance scale (> 1: classifier-free guidance, two UNet passes per step)")
	fs.StringVar(&f.preview, "preview", "none", "preview mode during the timed steps: none, latent2rgb, vae")
	fs.BoolVar(&f.asJSON, "json", false, "print JSON lines instead of a table")
	fs.BoolVar(&f.inProcess, inProcessFlag, false, "measure in this process (what each per-dtype child runs)")
	fs.StringVar(&f.images, imagesFlag, "", "write each row's first image here (raw RGB), for the parent's image differences")
	_ = fs.MarkHidden(inProcessFlag)
	_ = fs.MarkHidden(imagesFlag)
	completeWords(cmd, "preview", "none", "latent2rgb", "vae")
	completeBackends(cmd, "backends")
}

// benchPlan is bench's flags, checked.
type benchPlan struct {
	sizes    []int
	backends []binding.Backend
	dtypes   []binding.DType
	preview  binding.Preview
}

func (f *benchFlags) plan() (benchPlan, error) {
	var p benchPlan
	if f.steps < 2 {
		return p, fmt.Errorf("--steps must be at least 2 (one warm-up, one timed)")
	}
	for _, s := range strings.Split(f.sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 || n%8 != 0 {
			return p, fmt.Errorf("bad size %q: want positive multiples of 8", s)
		}
		p.sizes = append(p.sizes, n)
	}
	var err error
	if p.preview, err = binding.ParsePreview(f.preview); err != nil {
		return p, err
	}
	for _, s := range strings.Split(f.dtypes, ",") {
		d, err := binding.ParseDType(s)
		if err != nil {
			return p, err
		}
		p.dtypes = append(p.dtypes, d)
	}
	for _, s := range strings.Split(f.backends, ",") {
		b, err := binding.ParseBackend(s)
		if err != nil {
			return p, err
		}
		p.backends = append(p.backends, b)
	}
	return p, nil
}

func (f *benchFlags) run(cmd *cobra.Command, _ []string) error {
	p, err := f.plan()
	if err != nil {
		return err
	}
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	var rows []benchRow
	emit := func(row benchRow) error {
		rows = append(rows, row)
		if f.asJSON {
			return json.NewEncoder(stdout).Encode(row)
		}
		if row.Skipped == "" {
			fmt.Fprintf(stderr, "%s %s %dx%d: %.2f s/step\n", row.Model, row.label(), row.Size, row.Size, row.StepSeconds)
		}
		return nil
	}
	if f.inProcess {
		err = f.measure(cmd.Context(), p, stderr, emit)
	} else {
		err = f.runChildren(cmd, p, stderr, emit)
	}
	if err != nil || f.asJSON {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODEL\tBACKEND\tDEVICE\tDTYPE\tSIZE\tPREVIEW\tS/STEP (median)\tS/STEP (min)\tTEXT S\tVAE DECODE S\tLOAD S\tPEAK RSS\tTHREADS\tIMAGE (MAX |Δ|, PSNR)")
	var skipped []string
	for _, r := range rows {
		if r.Skipped != "" {
			skipped = append(skipped, fmt.Sprintf("skipped %s: %s", r.label(), r.Skipped))
			continue
		}
		diffs := "reference"
		if len(r.ImageDiffs) > 0 {
			var parts []string
			for _, d := range r.ImageDiffs {
				parts = append(parts, d.String())
			}
			diffs = strings.Join(parts, "; ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d²\t%s\t%.2f\t%.2f\t%.3f\t%.2f\t%.1f\t%s\t%d\t%s\n", r.Model, backendName(r.Backend),
			r.Device, r.DType, r.Size, r.Preview, r.StepSeconds, r.StepMin, r.TextSeconds, r.DecodeSec, r.LoadSeconds,
			formatBytes(r.PeakRSS), r.Threads, diffs)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, s := range skipped {
		fmt.Fprintln(stdout, s)
	}
	return nil
}

// runChildren measures each backend and dtype in a fresh process: one's
// weights and allocator caches would otherwise count in the next one's peak
// RSS. The children leave their images in a folder of the parent's, which
// compares each with the first row of its size and the first of its backend
// at that size.
func (f *benchFlags) runChildren(cmd *cobra.Command, p benchPlan, stderr io.Writer, emit func(benchRow) error) error {
	dir, err := os.MkdirTemp("", "stepwise-bench-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	refs := imageRefs{dir: dir, rows: map[imageRefKey]benchRow{}}
	diffed := func(row benchRow) error {
		row, err := refs.compare(row)
		if err != nil {
			return err
		}
		return emit(row)
	}
	for _, b := range p.backends {
		for _, dt := range p.dtypes {
			if err := f.runChild(cmd, b, dt, dir, stderr, diffed); err != nil {
				return err
			}
		}
	}
	return nil
}

// imageRefs are the rows later rows' images are compared with: the first of
// each size, and the first of each backend at each size.
type imageRefs struct {
	dir  string // where the rows' images are
	rows map[imageRefKey]benchRow
}

type imageRefKey struct {
	backend string // "": any backend
	size    int
}

// compare fills row's ImageDiffs (a skipped row has none), and makes it a
// reference where it is the first.
func (r imageRefs) compare(row benchRow) (benchRow, error) {
	if row.Skipped != "" {
		return row, nil
	}
	for _, k := range []imageRefKey{{"", row.Size}, {row.Backend, row.Size}} {
		ref, ok := r.rows[k]
		if !ok {
			r.rows[k] = row
			continue
		}
		if len(row.ImageDiffs) > 0 && row.ImageDiffs[0].Vs == ref.label() {
			continue // the first row of the size was this backend's too
		}
		c, err := compareImages(r.dir, ref, row)
		if err != nil {
			return row, err
		}
		row.ImageDiffs = append(row.ImageDiffs, c)
	}
	return row, nil
}

// compareImages compares the images row and ref left in dir.
func compareImages(dir string, ref, row benchRow) (imageComparison, error) {
	a, errA := os.ReadFile(benchImagePath(dir, ref))
	b, errB := os.ReadFile(benchImagePath(dir, row))
	if errA != nil || errB != nil {
		return imageComparison{}, fmt.Errorf("compare the images of %s and %s: %w", ref.label(), row.label(), errors.Join(errA, errB))
	}
	maxDiff, psnr, err := imageDiff(a, b)
	if err != nil {
		return imageComparison{}, fmt.Errorf("compare the images of %s and %s: %w", ref.label(), row.label(), err)
	}
	c := imageComparison{Vs: ref.label(), MaxAbsDiff: maxDiff}
	if !math.IsInf(psnr, 1) {
		c.PSNR = &psnr
	}
	return c, nil
}

// benchImagePath is where a row's first image is left.
func benchImagePath(dir string, r benchRow) string {
	return filepath.Join(dir, fmt.Sprintf("%s-%s-%d.rgb", backendName(r.Backend), r.DType, r.Size))
}

// errImageSizes: two images to compare differ in size.
var errImageSizes = errors.New("the images differ in size")

// imageDiff is the largest absolute difference of two 8-bit images and their
// PSNR in dB (+Inf when they are identical).
func imageDiff(a, b []byte) (maxAbs int, psnr float64, err error) {
	if len(a) != len(b) || len(a) == 0 {
		return 0, 0, fmt.Errorf("%w: %d and %d bytes", errImageSizes, len(a), len(b))
	}
	var sq float64
	for i := range a {
		d := int(a[i]) - int(b[i])
		if d < 0 {
			d = -d
		}
		maxAbs = max(maxAbs, d)
		sq += float64(d * d)
	}
	if sq == 0 {
		return 0, math.Inf(1), nil
	}
	return maxAbs, 10 * math.Log10(255*255/(sq/float64(len(a)))), nil
}

// benchChildError is a per-backend-and-dtype bench process that failed; its
// own stderr has already been passed on.
type benchChildError struct {
	Backend binding.Backend
	DType   binding.DType
	Err     error
}

func (e *benchChildError) Error() string {
	if e.Backend == binding.BackendLibtorch {
		return fmt.Sprintf("bench process for %s: %v", e.DType, e.Err)
	}
	return fmt.Sprintf("bench process for %s %s: %v", e.Backend, e.DType, e.Err)
}
func (e *benchChildError) Unwrap() error { return e.Err }

// runChild measures backend b and dtype dt in a child process of this
// binary, with the flags given to this one, and emits its rows as they
// arrive; its images are left in images.
func (f *benchFlags) runChild(cmd *cobra.Command, b binding.Backend, dt binding.DType, images string, stderr io.Writer,
	emit func(benchRow) error) error {
	exe, err := os.Executable()
	if err != nil {
		return &benchChildError{b, dt, fmt.Errorf("find this binary: %w", err)}
	}
	args := []string{"bench", "--backends", b.String(), "--dtypes", dt.String(), "--json", "--" + inProcessFlag,
		"--" + imagesFlag, images}
	cmd.Flags().Visit(func(fl *pflag.Flag) {
		switch fl.Name {
		case "backends", "dtypes", "json", inProcessFlag, imagesFlag:
		default:
			args = append(args, "--"+fl.Name+"="+fl.Value.String())
		}
	})
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	child := exec.CommandContext(ctx, exe, args...)
	child.Stderr = stderr
	out, err := child.StdoutPipe()
	if err != nil {
		return &benchChildError{b, dt, err}
	}
	if err := child.Start(); err != nil {
		return &benchChildError{b, dt, err}
	}
	var rows []benchRow
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var row benchRow
		if err := json.Unmarshal(line, &row); err != nil {
			_ = child.Process.Kill()
			_ = child.Wait()
			return &benchChildError{b, dt, fmt.Errorf("read its row %q: %w", line, err)}
		}
		rows = append(rows, row)
	}
	if err := child.Wait(); err != nil {
		return &benchChildError{b, dt, err}
	}
	// A child that could not read its own VmHWM still has the kernel's
	// account of it.
	var maxRSS int64 = -1
	if ru, ok := child.ProcessState.SysUsage().(*syscall.Rusage); ok {
		maxRSS = ru.Maxrss * 1024 // Linux reports KiB
	}
	for _, row := range rows {
		if row.PeakRSS <= 0 && row.Skipped == "" {
			row.PeakRSS = maxRSS
		}
		if err := emit(row); err != nil {
			return err
		}
	}
	return nil
}

// measure calls the engine directly, not the pipeline: it times the engine.
func (f *benchFlags) measure(ctx context.Context, p benchPlan, stderr io.Writer, emit func(benchRow) error) error {
	if ctx == nil {
		ctx = context.Background()
	}
	lib, path, name, err := f.engine.loadBenchModel(f.model, f.cache, stderr)
	if err != nil {
		return err
	}
	threads := lib.Threads()
	for _, b := range p.backends {
		for _, dt := range p.dtypes {
			if err := f.measureOne(ctx, lib, p, b, dt, path, name, threads, emit); err != nil {
				return err
			}
		}
	}
	return nil
}

// measureOne times backend b with dtype dt at every size; a combination the
// backend cannot run (binding.ErrUnsupported at open) is a skipped row.
func (f *benchFlags) measureOne(ctx context.Context, lib *binding.Library, p benchPlan, b binding.Backend, dt binding.DType,
	path, name string, threads int, emit func(benchRow) error) error {
	t0 := time.Now()
	m, err := lib.OpenSD(binding.SDOptions{Path: path, TokenizerDir: f.tokenizer, DType: dt, Backend: b})
	if errors.Is(err, binding.ErrUnsupported) {
		return emit(benchRow{Model: name, Backend: b.String(), DType: dt.String(), Skipped: err.Error(), PID: os.Getpid()})
	}
	if err != nil {
		return err
	}
	defer m.Close()
	load := time.Since(t0).Seconds()
	for _, size := range p.sizes {
		var stepTimes []float64
		var last time.Duration
		req := binding.GenerateRequest{
			Prompt: "a photograph of an astronaut riding a horse", Width: size, Height: size, Steps: f.steps,
			BatchSize: 1, CFGScale: f.cfg, Sampler: binding.Euler, Seed: 1, Preview: p.preview, PreviewEvery: 1,
			OnStep: func(s binding.Step) {
				if s.Step > 1 {
					stepTimes = append(stepTimes, (s.Elapsed - last).Seconds())
				}
				last = s.Elapsed
			},
		}
		res, err := m.Generate(ctx, req)
		if err != nil {
			return err
		}
		sort.Float64s(stepTimes)
		row := benchRow{
			Model: name, Backend: b.String(), Device: m.Info().Device, DType: m.Info().DType.String(), Size: size, Steps: f.steps,
			CFG: f.cfg > 1, LoadSeconds: load, TextSeconds: res.Text.Seconds(), StepSeconds: stepTimes[len(stepTimes)/2],
			StepMin: stepTimes[0], DecodeSec: res.Decode.Seconds(), PeakRSS: peakRSS(), Threads: threads,
			Preview: p.preview.String(), PID: os.Getpid(),
		}
		if f.images != "" {
			if err := os.WriteFile(benchImagePath(f.images, row), res.Images[0].Pix, 0o600); err != nil {
				return err
			}
		}
		if err := emit(row); err != nil {
			return err
		}
	}
	return nil
}

// loadBenchModel loads the engine and finds the model a bench times: model,
// else a random-weight SD 1.5-sized one made once in cache.
func (e *engineFlags) loadBenchModel(model, cache string, stderr io.Writer) (lib *binding.Library, path, name string, err error) {
	if lib, err = e.load(stderr); err != nil {
		return nil, "", "", err
	}
	if model != "" {
		return lib, model, model, nil
	}
	path = filepath.Join(cache, "sd15-random")
	if _, err := os.Stat(filepath.Join(path, "unet", "diffusion_pytorch_model.safetensors")); err != nil {
		fmt.Fprintf(stderr, "making a random-weight SD 1.5-sized model in %s (once)...\n", path)
		if err := models.MakeRandomSD(lib, path, models.SD15Arch(), 1); err != nil {
			return nil, "", "", err
		}
	}
	return lib, path, "sd15-sized (random)", nil
}

// procStatusBytes reads a memory figure (VmHWM, VmRSS) of this process from
// /proc/self/status; -1 where it cannot.
func procStatusBytes(key string) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			if kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64); err == nil {
				return kb * 1024
			}
		}
	}
	return -1
}

// peakRSS is this process's peak resident memory so far: VmHWM, which
// belongs to this process's own address space. getrusage's ru_maxrss is the
// fallback only: across exec Linux keeps the larger of the old and new
// peaks, so a child would inherit its parent's.
func peakRSS() int64 {
	if n := procStatusBytes("VmHWM"); n >= 0 {
		return n
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return ru.Maxrss * 1024 // Linux reports KiB
}

// errNoCommonRows: the two bench outputs share no (dtype, size).
var errNoCommonRows = errors.New("the baseline and the current bench measured no (backend, dtype, size) in common")

// benchMismatchError: a (dtype, size) was measured on different work in the
// two outputs, or in two rounds of one (Rounds), so its ratios would mean
// nothing.
type benchMismatchError struct {
	DType      string
	Size       int
	Field      string
	Base, Curr string // Rounds: the first round's and this one's
	Rounds     bool
}

func (e *benchMismatchError) Error() string {
	if e.Rounds {
		return fmt.Sprintf("%s %d²: the rounds differ in %s (first %s, this one %s)", e.DType, e.Size, e.Field, e.Base, e.Curr)
	}
	return fmt.Sprintf("%s %d²: the runs differ in %s (baseline %s, current %s)", e.DType, e.Size, e.Field, e.Base, e.Curr)
}

// benchFileError: a bench output could not be read.
type benchFileError struct {
	Path string
	Line int // 0: the file as a whole
	Err  error
}

func (e *benchFileError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %v", e.Path, e.Line, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.Path, e.Err)
}
func (e *benchFileError) Unwrap() error { return e.Err }

// compareRow is a bench JSON line of any version: 201b204's fields are
// benchRow's, and later benches may add the optional ones here.
type compareRow struct {
	benchRow
	EncodeSec *float64 `json:"vae_encode_seconds"` // absent where not measured
}

type compareKey struct {
	backend string // libtorch for rows that name none
	dtype   string
	size    int
}

// label is the key's backend and dtype as the DTYPE column shows them: the
// dtype alone for libtorch, as benches before the sdcpp backend did.
func (k compareKey) label() string {
	if k.backend == binding.BackendLibtorch.String() {
		return k.dtype
	}
	return k.backend + " " + k.dtype
}

func newBenchCompareCommand() *cobra.Command {
	return newCommand("compare BASE.json CURRENT.json",
		"print current/baseline ratios of two `bench --json` outputs, per dtype and size",
		cobra.ExactArgs(2), func(cmd *cobra.Command, args []string) error {
			base, err := readBenchRows(args[0])
			if err != nil {
				return err
			}
			cur, err := readBenchRows(args[1])
			if err != nil {
				return err
			}
			return compareBench(cmd.OutOrStdout(), base, cur)
		})
}

// readBenchRows reads the JSON lines of one bench output, grouped by
// (dtype, size): several rows of one are rounds of the same measurement
// (bench-compare's ROUNDS), and must have timed the same work.
func readBenchRows(path string) (map[compareKey][]compareRow, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, &benchFileError{Path: path, Err: err}
	}
	rows := map[compareKey][]compareRow{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		var r compareRow
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, &benchFileError{Path: path, Line: i + 1, Err: err}
		}
		if r.Skipped != "" {
			continue
		}
		k := compareKey{backendName(r.Backend), r.DType, r.Size}
		if earlier := rows[k]; len(earlier) > 0 {
			if err := sameWork(earlier[0], r); err != nil {
				var m *benchMismatchError
				if errors.As(err, &m) {
					m.Rounds = true
				}
				return nil, &benchFileError{Path: path, Line: i + 1, Err: err}
			}
		}
		rows[k] = append(rows[k], r)
	}
	if len(rows) == 0 {
		return nil, &benchFileError{Path: path, Err: errors.New("no bench rows")}
	}
	return rows, nil
}

// compareBench prints, per (dtype, size) that both measured, each figure of
// the baseline and the current run and their ratio current/baseline; where a
// side has several rounds of a row, each figure is their median.
func compareBench(w io.Writer, baseRounds, curRounds map[compareKey][]compareRow) error {
	var keys []compareKey
	var onlyOne []string
	encode := false
	rounds := 1
	base, cur := map[compareKey]compareRow{}, map[compareKey]compareRow{}
	for k, cs := range curRounds {
		bs, ok := baseRounds[k]
		if !ok {
			onlyOne = append(onlyOne, fmt.Sprintf("%s %d² (current only)", k.label(), k.size))
			continue
		}
		if err := sameWork(bs[0], cs[0]); err != nil {
			return err
		}
		b, c := medianRow(bs), medianRow(cs)
		base[k], cur[k] = b, c
		keys = append(keys, k)
		encode = encode || (b.EncodeSec != nil && c.EncodeSec != nil)
		rounds = max(rounds, len(bs), len(cs))
	}
	for k := range baseRounds {
		if _, ok := curRounds[k]; !ok {
			onlyOne = append(onlyOne, fmt.Sprintf("%s %d² (baseline only)", k.label(), k.size))
		}
	}
	if len(keys) == 0 {
		return errNoCommonRows
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].backend != keys[j].backend {
			return keys[i].backend < keys[j].backend
		}
		if keys[i].dtype != keys[j].dtype {
			return keys[i].dtype < keys[j].dtype
		}
		return keys[i].size < keys[j].size
	})
	sort.Strings(onlyOne)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "DTYPE\tSIZE\tS/STEP\tVAE DECODE"
	if encode {
		head += "\tVAE ENCODE"
	}
	fmt.Fprintln(tw, head+"\tLOAD\tTEXT ENCODE\tPEAK RSS")
	for _, k := range keys {
		b, c := base[k], cur[k]
		cells := []string{k.label(), fmt.Sprintf("%d²", k.size),
			ratioCell(b.StepSeconds, c.StepSeconds, secs), ratioCell(b.DecodeSec, c.DecodeSec, secs)}
		if encode {
			cell := "-"
			if b.EncodeSec != nil && c.EncodeSec != nil {
				cell = ratioCell(*b.EncodeSec, *c.EncodeSec, secs)
			}
			cells = append(cells, cell)
		}
		cells = append(cells, ratioCell(b.LoadSeconds, c.LoadSeconds, secs), ratioCell(b.TextSeconds, c.TextSeconds, secs),
			ratioCell(float64(b.PeakRSS), float64(c.PeakRSS), func(v float64) string { return formatBytes(int64(v)) }))
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	note := "each cell: baseline -> current (current/baseline; below 1 is faster or smaller)"
	if rounds > 1 {
		note += fmt.Sprintf("; medians of up to %d rounds", rounds)
	}
	fmt.Fprintln(w, note)
	for _, s := range onlyOne {
		fmt.Fprintf(w, "not compared: %s\n", s)
	}
	return nil
}

// medianRow is rows[0] with each timed figure and the peak RSS replaced by
// the median over rows (the mean of the middle two for an even count); the
// VAE encode only where every row has one.
func medianRow(rows []compareRow) compareRow {
	med := func(get func(compareRow) float64) float64 {
		v := make([]float64, len(rows))
		for i, r := range rows {
			v[i] = get(r)
		}
		sort.Float64s(v)
		n := len(v)
		if n%2 == 1 {
			return v[n/2]
		}
		return (v[n/2-1] + v[n/2]) / 2
	}
	m := rows[0]
	m.StepSeconds = med(func(r compareRow) float64 { return r.StepSeconds })
	m.DecodeSec = med(func(r compareRow) float64 { return r.DecodeSec })
	m.LoadSeconds = med(func(r compareRow) float64 { return r.LoadSeconds })
	m.TextSeconds = med(func(r compareRow) float64 { return r.TextSeconds })
	m.PeakRSS = int64(med(func(r compareRow) float64 { return float64(r.PeakRSS) }))
	m.EncodeSec = nil
	all := true
	for _, r := range rows {
		all = all && r.EncodeSec != nil
	}
	if all {
		e := med(func(r compareRow) float64 { return *r.EncodeSec })
		m.EncodeSec = &e
	}
	return m
}

// sameWork checks that two rows timed the same work.
func sameWork(b, c compareRow) error {
	for _, f := range []struct{ name, b, c string }{
		{"model", b.Model, c.Model},
		{"device", b.Device, c.Device},
		{"steps", strconv.Itoa(b.Steps), strconv.Itoa(c.Steps)},
		{"cfg", strconv.FormatBool(b.CFG), strconv.FormatBool(c.CFG)},
		{"threads", strconv.Itoa(b.Threads), strconv.Itoa(c.Threads)},
		{"preview", b.Preview, c.Preview},
	} {
		if f.b != f.c {
			return &benchMismatchError{DType: compareKey{backendName(b.Backend), b.DType, b.Size}.label(), Size: b.Size, Field: f.name, Base: f.b, Curr: f.c}
		}
	}
	return nil
}

func secs(v float64) string { return fmt.Sprintf("%.3g s", v) }

// ratioCell is "baseline -> current (ratio×)"; the ratio is n/a where the
// baseline has no figure.
func ratioCell(base, cur float64, format func(float64) string) string {
	ratio := "n/a"
	if base > 0 && cur >= 0 {
		ratio = fmt.Sprintf("%.2f×", cur/base)
	}
	return fmt.Sprintf("%s -> %s (%s)", format(base), format(cur), ratio)
}
