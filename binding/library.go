package binding

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ebitengine/purego"
)

// LibraryName is the file name of the engine library.
const LibraryName = "libstepwise.so"

// Options configure Load.
type Options struct {
	// Path, when set, is the only library file tried.
	Path string
	// Device is "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or
	// "mps". Empty means $STEPWISE_DEVICE, then auto.
	Device string
	// Threads sets libtorch's intra-op threads; 0 means $STEPWISE_THREADS, else
	// every CPU the process may use (libtorch's OpenMP default can be 1).
	Threads int
	// Logger receives the engine's log lines; nil means slog.Default().
	Logger *slog.Logger
}

// Library is the loaded engine. It is safe for concurrent use.
type Library struct {
	path    string
	handle  uintptr
	device  Device
	threads int
	fn      functions
}

// functions holds every C function of the ABI, resolved once at load.
type functions struct {
	abiVersion     func() int32
	version        func() string
	torchVersion   func() string
	buildInfo      func() string
	setLogCallback func(cb uintptr, userData uintptr)
	setNumThreads  func(n int32)
	deviceCount    func() int32
	deviceGet      func(i int32, out *cDeviceInfo, err *cError) int32

	backendAvailable func(backend int32, err *cError) int32

	sdDefaultParams func(p *cSDModelParams)
	sdOpen          func(p *cSDModelParams, out *uintptr, err *cError) int32
	sdClose         func(m uintptr)
	sdInfo          func(m uintptr, out *cModelInfo, err *cError) int32
	sdCancel        func(m uintptr)

	segDefaultParams func(p *cSegModelParams)
	segOpen          func(p *cSegModelParams, out *uintptr, err *cError) int32
	segClose         func(m uintptr)
	segInfo          func(m uintptr, out *cModelInfo, err *cError) int32
	segCancel        func(m uintptr)

	genDefaultParams func(p *cGenerateParams)
	generate         func(m uintptr, p *cGenerateParams, out **cGenerateResult, err *cError) int32
	genResultFree    func(r *cGenerateResult)
	tokenize         func(m uintptr, text string, ids *int64, capacity int32, count *int32, err *cError) int32

	segDefaultSegParams func(p *cSegmentParams)
	segment             func(m uintptr, p *cSegmentParams, out **cSegmentResult, err *cError) int32
	segResultFree       func(r *cSegmentResult)

	sdWriteRandom  func(dir string, seed uint64, err *cError) int32
	segWriteRandom func(path string, arch *cSegArch, seed uint64, err *cError) int32
}

// symbols pairs each C name with the field it fills.
func (f *functions) symbols() []struct {
	name string
	ptr  any
} {
	return []struct {
		name string
		ptr  any
	}{
		{"sw_version", &f.version},
		{"sw_torch_version", &f.torchVersion},
		{"sw_build_info", &f.buildInfo},
		{"sw_set_log_callback", &f.setLogCallback},
		{"sw_set_num_threads", &f.setNumThreads},
		{"sw_device_count", &f.deviceCount},
		{"sw_device_get", &f.deviceGet},
		{"sw_backend_available", &f.backendAvailable},
		{"sw_sd_model_default_params", &f.sdDefaultParams},
		{"sw_sd_model_open", &f.sdOpen},
		{"sw_sd_model_close", &f.sdClose},
		{"sw_sd_model_info", &f.sdInfo},
		{"sw_sd_model_cancel", &f.sdCancel},
		{"sw_seg_model_default_params", &f.segDefaultParams},
		{"sw_seg_model_open", &f.segOpen},
		{"sw_seg_model_close", &f.segClose},
		{"sw_seg_model_info", &f.segInfo},
		{"sw_seg_model_cancel", &f.segCancel},
		{"sw_generate_default_params", &f.genDefaultParams},
		{"sw_sd_generate", &f.generate},
		{"sw_generate_result_free", &f.genResultFree},
		{"sw_sd_tokenize", &f.tokenize},
		{"sw_segment_default_params", &f.segDefaultSegParams},
		{"sw_seg_segment", &f.segment},
		{"sw_segment_result_free", &f.segResultFree},
		{"sw_sd_write_random_weights", &f.sdWriteRandom},
		{"sw_seg_write_random_weights", &f.segWriteRandom},
	}
}

// LoadError lists every place Load looked for the library and why each failed.
type LoadError struct {
	Tried []Attempt
}

// Attempt is one library candidate that failed to load.
type Attempt struct {
	Path string
	Err  error
}

// Unwrap exposes each attempt's error, so errors.As finds an *ABIMismatchError.
func (e *LoadError) Unwrap() []error {
	out := make([]error, len(e.Tried))
	for i, a := range e.Tried {
		out[i] = a.Err
	}
	return out
}

func (e *LoadError) Error() string {
	var b strings.Builder
	b.WriteString("load " + LibraryName + ": no usable library found; tried:")
	for _, a := range e.Tried {
		where := a.Path
		if !strings.ContainsRune(where, os.PathSeparator) {
			where += " (system library path)"
		}
		fmt.Fprintf(&b, "\n  %s: %v", where, a.Err)
	}
	b.WriteString("\nbuild it with `make build`, or point STEPWISE_LIB at it")
	return b.String()
}

// ABIMismatchError reports a library built for another ABI version.
type ABIMismatchError struct {
	Path    string
	Library int32
	Want    int32
}

func (e *ABIMismatchError) Error() string {
	return fmt.Sprintf("%s has ABI version %d, this stepwise needs ABI version %d (rebuild the library)", e.Path, e.Library, e.Want)
}

// Candidates lists, in order, the library paths Load tries when no explicit
// path is given: $STEPWISE_LIB, next to the executable, ./build, then the
// system's search path.
func Candidates() []string {
	var out []string
	if p := os.Getenv("STEPWISE_LIB"); p != "" {
		out = append(out, p)
	}
	if exe, err := os.Executable(); err == nil {
		out = append(out, filepath.Join(filepath.Dir(exe), LibraryName))
	}
	if wd, err := os.Getwd(); err == nil {
		out = append(out, filepath.Join(wd, "build", LibraryName))
	}
	return append(out, LibraryName) // bare name: the dynamic loader's own search
}

var (
	logger      atomic.Pointer[slog.Logger]
	logCallback = sync.OnceValue(func() uintptr { return purego.NewCallback(onLog) })
)

// Load finds, opens and checks the engine library, then selects the device.
func Load(opts Options) (*Library, error) {
	candidates := Candidates()
	if opts.Path != "" {
		candidates = []string{opts.Path}
	}
	var tried []Attempt
	for _, path := range candidates {
		lib, err := open(path)
		if err != nil {
			tried = append(tried, Attempt{Path: path, Err: err})
			continue
		}
		if err := lib.init(opts); err != nil {
			return nil, err
		}
		return lib, nil
	}
	return nil, &LoadError{Tried: tried}
}

func open(path string) (*Library, error) {
	if strings.ContainsRune(path, os.PathSeparator) {
		if _, err := os.Stat(path); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, errors.New("no such file")
			}
			return nil, err
		}
	}
	applyThreadPoolEnv()
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_LOCAL)
	if err != nil {
		return nil, err
	}
	lib := &Library{path: path, handle: h}
	sym, err := purego.Dlsym(h, "sw_abi_version")
	if err != nil {
		return nil, fmt.Errorf("not a stepwise library (no sw_abi_version): %w", err)
	}
	purego.RegisterFunc(&lib.fn.abiVersion, sym)
	if v := lib.fn.abiVersion(); v != ABIVersion {
		// Not closed: a library that ran its static constructors is left loaded.
		return nil, &ABIMismatchError{Path: path, Library: v, Want: ABIVersion}
	}
	var missing []string
	for _, s := range lib.fn.symbols() {
		sym, err := purego.Dlsym(h, s.name)
		if err != nil {
			missing = append(missing, s.name)
			continue
		}
		purego.RegisterFunc(s.ptr, sym)
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing symbols: %s", strings.Join(missing, ", "))
	}
	// Only the library that passed the checks joins the global scope, as
	// PyTorch puts libtorch and its dependencies (torch/__init__.py loads them
	// RTLD_GLOBAL). Left local, a CUDA libtorch's first generation jumped to
	// address 0 (libtorch 2.11+cu130 on an H100; docs/engine.md "Checked on
	// CUDA"). A candidate refused above stays local, so its symbols never
	// stand in for those of the one chosen after it.
	if _, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL|rtldNoload); err != nil {
		return nil, fmt.Errorf("making the library's symbols global: %w", err)
	}
	return lib, nil
}

// rtldNoload is glibc's RTLD_NOLOAD, which purego does not name: dlopen then
// only changes the flags of a library already loaded.
const rtldNoload = 0x4

// Threads is the number of CPU threads the engine computes with: Options.Threads,
// else $STEPWISE_THREADS, else every CPU.
func (l *Library) Threads() int { return l.threads }

func (l *Library) init(opts Options) error {
	lg := opts.Logger
	if lg == nil {
		lg = slog.Default()
	}
	logger.Store(lg)
	l.fn.setLogCallback(logCallback(), 0)
	stepCallback() // every trampoline exists before the first call needs it
	threads := opts.Threads
	if threads <= 0 {
		if n, err := strconv.Atoi(os.Getenv("STEPWISE_THREADS")); err == nil && n > 0 {
			threads = n
		} else {
			threads = runtime.NumCPU()
		}
	}
	l.fn.setNumThreads(int32(threads))
	l.threads = threads
	devices, err := l.Devices()
	if err != nil {
		return err
	}
	want := opts.Device
	if want == "" {
		want = os.Getenv("STEPWISE_DEVICE")
	}
	d, err := SelectDevice(devices, want)
	if err != nil {
		return err
	}
	l.device = d
	lg.Debug("engine loaded", "path", l.path, "version", l.Version().Stepwise, "device", d.ID)
	return nil
}

// onLog receives the engine's log lines on whatever thread logged them.
func onLog(level int32, message *byte, _ uintptr) (ret int32) {
	defer func() {
		if recover() != nil {
			ret = 0
		}
	}()
	lg := logger.Load()
	if lg == nil {
		return 0
	}
	lvl := slog.LevelDebug
	switch level {
	case 1:
		lvl = slog.LevelInfo
	case 2:
		lvl = slog.LevelWarn
	case 3:
		lvl = slog.LevelError
	}
	lg.Log(context.Background(), lvl, goString(message), "component", "engine")
	return 0
}

// Path is the file the library was loaded from.
func (l *Library) Path() string { return l.path }

// Device is the device selected at load time.
func (l *Library) Device() Device { return l.device }

// VersionInfo describes the library.
type VersionInfo struct {
	Stepwise string          `json:"stepwise"`
	ABI      int32           `json:"abi"`
	Torch    string          `json:"torch"`
	Build    string          `json:"build"`
	Backends []BackendStatus `json:"backends"`
}

// BackendStatus says whether one backend can be used in this process.
type BackendStatus struct {
	Backend   Backend `json:"backend"`
	Available bool    `json:"available"`
	// Reason is why it is not available (not built in, its library or a
	// symbol missing); empty when it is.
	Reason string `json:"reason,omitempty"`
	// Library is the file an available backend of its own library was
	// loaded from (sdcpp: libstable-diffusion.so); empty for libtorch.
	Library string `json:"library,omitempty"`
}

// Version reports the library's versions, build flags and backends.
func (l *Library) Version() VersionInfo {
	v := VersionInfo{
		Stepwise: l.fn.version(),
		ABI:      l.fn.abiVersion(),
		Torch:    l.fn.torchVersion(),
		Build:    l.fn.buildInfo(),
	}
	for _, b := range Backends() {
		st := BackendStatus{Backend: b, Available: true}
		if err := l.BackendAvailable(b); err != nil {
			st.Available, st.Reason = false, err.Error()
		} else {
			st.Library = backendLibrary(v.Build, b)
		}
		v.Backends = append(v.Backends, st)
	}
	return v
}

// backendLibrary is the library backend b was loaded from as the build info
// names it ("backends: libtorch, sdcpp (/path/libstable-diffusion.so); ..."),
// or "" where it names none.
func backendLibrary(build string, b Backend) string {
	_, list, ok := strings.Cut(build, "backends: ")
	if !ok {
		return ""
	}
	list, _, _ = strings.Cut(list, "; ")
	for _, item := range strings.Split(list, ", ") {
		if rest, ok := strings.CutPrefix(item, b.String()+" ("); ok && strings.HasSuffix(rest, ")") {
			return strings.TrimSuffix(rest, ")")
		}
	}
	return ""
}

// BackendAvailable returns nil when b can open models in this process, else
// an error matching ErrUnsupported that says why (the sdcpp backend: not built
// in, or its library or one of its symbols missing). The first call for
// BackendSDCPP loads stable-diffusion.cpp's library.
func (l *Library) BackendAvailable(b Backend) error {
	var ce cError
	return check("sw_backend_available", l.fn.backendAvailable(int32(b), &ce), &ce)
}
