// Package modelcache keeps loaded models: keyed, reference counted
// references, one load per model however many ask for it at once, and
// least-recently-used eviction of idle models under a memory budget. It knows
// nothing of how a model is read: a Loader does that (LibraryLoader with the
// native engine; a fake in unit tests).
package modelcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/stepwise-sd/stepwise/binding"
)

// Kind is the kind of model a cache entry holds.
type Kind int

// Model kinds.
const (
	KindSD Kind = iota
	KindSeg
)

// String is "sd" or "seg".
func (k Kind) String() string {
	if k == KindSeg {
		return "seg"
	}
	return "sd"
}

// Key identifies a loaded model: the same file on the same device in the same
// dtype through the same backend is loaded once.
type Key struct {
	Kind   Kind
	Path   string        // absolute, cleaned
	Device string        // resolved, e.g. "cpu", "cuda:0"
	DType  binding.DType // resolved, never DTypeAuto
	// VAE is the VAE that replaces an SD model's own (absolute, cleaned); empty: its own.
	VAE string
	// Backend is the engine that runs an SD model (the zero value: libtorch).
	Backend binding.Backend
}

// String names the key in logs.
func (k Key) String() string {
	s := fmt.Sprintf("%s:%s@%s/%s", k.Kind, k.Path, k.Device, k.DType)
	if k.VAE != "" {
		s += "+vae:" + k.VAE
	}
	if k.Backend != binding.BackendLibtorch {
		s += "+" + k.Backend.String()
	}
	return s
}

// WithBackend is k run by backend b; only SD models have a choice. Whether b
// can be used in this process is Cache.BackendAvailable's to say.
func (k Key) WithBackend(b binding.Backend) (Key, error) {
	if b == binding.BackendLibtorch {
		return k, nil
	}
	if k.Kind != KindSD {
		return Key{}, fmt.Errorf("%w: only Stable Diffusion models have a backend to choose", binding.ErrInvalidArgument)
	}
	k.Backend = b
	return k, nil
}

// WithVAE is k with vae replacing the model's own VAE; only SD models have one.
func (k Key) WithVAE(vae string) (Key, error) {
	if vae == "" {
		return k, nil
	}
	if k.Kind != KindSD {
		return Key{}, fmt.Errorf("%w: only Stable Diffusion models take a VAE", binding.ErrInvalidArgument)
	}
	abs, err := filepath.Abs(vae)
	if err != nil {
		return Key{}, fmt.Errorf("VAE path %s: %w", vae, err)
	}
	k.VAE = filepath.Clean(abs)
	return k, nil
}

// Model is a loaded model: *binding.SDModel and *binding.SegModel are.
type Model interface {
	Info() binding.ModelInfo
	Close() error
}

// Loader reads models for a Cache.
type Loader interface {
	// Device resolves a device request ("" for the loader's own) to the device
	// a model would be loaded on.
	Device(name string) (binding.Device, error)
	// Load reads the model key names. It gets no context: one load serves
	// every request waiting for the model, so no single caller may cancel it.
	Load(key Key) (Model, error)
}

// BackendChecker is a Loader that can say whether a backend is usable before
// a model is loaded with it, and list the backends; LibraryLoader is one.
type BackendChecker interface {
	BackendAvailable(b binding.Backend) error
	// Backends lists every backend, usable or not (binding.Library.Version's).
	Backends() []binding.BackendStatus
}

// Options configure a Cache.
type Options struct {
	// Budget is the memory, in bytes, that loaded models may take; idle models
	// are evicted, least recently used first, to stay under it. 0 means 75% of
	// the selected device's memory, or no limit when that is unknown; < 0 means
	// no limit.
	Budget int64
	Logger *slog.Logger
}

// Stats counts what the cache did.
type Stats struct {
	Loads      int64 `json:"loads"`     // models read from disk
	Hits       int64 `json:"hits"`      // requests served by a loaded model
	Evictions  int64 `json:"evictions"` // models freed to stay under the budget
	Loaded     int   `json:"loaded"`    // models loaded now
	BytesInUse int64 `json:"bytes"`     // their weight bytes
	Budget     int64 `json:"budget"`    // the budget; 0 when unlimited
}

// Cache owns loaded model handles. Models are reference counted: one in use is
// never freed, and concurrent requests for one model load it once.
type Cache struct {
	loader Loader
	budget int64
	log    *slog.Logger

	mu      sync.Mutex
	entries map[Key]*entry
	tick    uint64
	stats   Stats
	closed  bool
}

type entry struct {
	key      Key
	ready    chan struct{} // closed when the load finished
	err      error         // the load's error, set before ready closes
	model    Model
	refs     int
	lastUsed uint64
	bytes    int64 // actual once loaded, estimated while loading
}

func (e *entry) loaded() bool {
	select {
	case <-e.ready:
		return e.err == nil
	default:
		return false
	}
}

func (e *entry) close() {
	if e.model != nil {
		e.model.Close()
	}
}

// New makes an empty cache over loader.
func New(loader Loader, opts Options) *Cache {
	budget := opts.Budget
	if budget == 0 {
		if d, err := loader.Device(""); err == nil && d.TotalMemory > 0 {
			budget = d.TotalMemory / 4 * 3
		}
	}
	if budget < 0 {
		budget = 0
	}
	lg := opts.Logger
	if lg == nil {
		lg = slog.Default()
	}
	return &Cache{loader: loader, budget: budget, log: lg, entries: map[Key]*entry{}}
}

// Ref is a counted reference to a loaded model; Release it when done.
type Ref struct {
	c    *Cache
	e    *entry
	once sync.Once
}

// Model is the loaded model.
func (r *Ref) Model() Model { return r.e.model }

// SD is the model of a KindSD reference loaded by the engine, else nil.
func (r *Ref) SD() *binding.SDModel {
	m, _ := r.e.model.(*binding.SDModel)
	return m
}

// Seg is the model of a KindSeg reference loaded by the engine, else nil.
func (r *Ref) Seg() *binding.SegModel {
	m, _ := r.e.model.(*binding.SegModel)
	return m
}

// Key identifies the model.
func (r *Ref) Key() Key { return r.e.key }

// Info describes the model.
func (r *Ref) Info() binding.ModelInfo { return r.e.model.Info() }

// Release gives the reference back; calling it again does nothing.
func (r *Ref) Release() { r.once.Do(func() { r.c.release(r.e) }) }

// KeyFor resolves a request into a cache key: the absolute path, the device
// (empty: the loader's) and the dtype (auto: the device's default; f32 for
// segmentation models).
func (c *Cache) KeyFor(kind Kind, path, device string, dtype binding.DType) (Key, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Key{}, fmt.Errorf("model path %s: %w", path, err)
	}
	d, err := c.loader.Device(device)
	if err != nil {
		return Key{}, err
	}
	if kind == KindSeg && dtype == binding.DTypeAuto {
		dtype = binding.F32
	}
	return Key{Kind: kind, Path: filepath.Clean(abs), Device: d.ID, DType: dtype.Resolve(d.Kind)}, nil
}

// BackendAvailable returns nil when models can be loaded with backend b, else
// the loader's reason (matching binding.ErrUnsupported for the library's).
// A loader that cannot tell says nil: the load itself then fails.
func (c *Cache) BackendAvailable(b binding.Backend) error {
	if bc, ok := c.loader.(BackendChecker); ok {
		return bc.BackendAvailable(b)
	}
	return nil
}

// Backends lists every backend with whether the loader can use it (and the
// library it found); a loader that cannot tell lists them all as available.
func (c *Cache) Backends() []binding.BackendStatus {
	if bc, ok := c.loader.(BackendChecker); ok {
		return bc.Backends()
	}
	var out []binding.BackendStatus
	for _, b := range binding.Backends() {
		out = append(out, binding.BackendStatus{Backend: b, Available: true})
	}
	return out
}

// ErrInUse is returned by Unload for a model that is in use or still loading.
var ErrInUse = errors.New("model is in use")

// ErrClosed is returned by Acquire after Close.
var ErrClosed = errors.New("model cache is closed")

// Acquire returns a reference to the model for key, loading it if needed. A
// request that arrives while the same model is loading waits for that load;
// ctx bounds the wait.
func (c *Cache) Acquire(ctx context.Context, key Key) (*Ref, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if e, ok := c.entries[key]; ok {
		e.refs++
		c.touch(e)
		c.mu.Unlock()
		if !e.loaded() { // a loaded model is returned without looking at ctx
			select {
			case <-e.ready:
			case <-ctx.Done():
				c.release(e)
				return nil, ctx.Err()
			}
		}
		if e.err != nil {
			return nil, e.err
		}
		c.mu.Lock()
		c.stats.Hits++
		c.mu.Unlock()
		return &Ref{c: c, e: e}, nil
	}
	e := &entry{key: key, ready: make(chan struct{}), refs: 1, bytes: estimateBytes(key)}
	c.touch(e)
	c.entries[key] = e
	victims := c.evictLocked(e)
	c.mu.Unlock()
	closeAll(victims)

	c.log.Info("loading model", "kind", key.Kind.String(), "path", key.Path, "device", key.Device, "dtype", key.DType.String())
	m, err := c.loader.Load(key)

	c.mu.Lock()
	if err != nil {
		e.err = err
		delete(c.entries, key)
		close(e.ready)
		c.mu.Unlock()
		return nil, err
	}
	e.model = m
	e.bytes = m.Info().WeightBytes
	c.stats.Loads++
	close(e.ready)
	victims = c.evictLocked(nil)
	over := c.budget > 0 && c.usedLocked() > c.budget
	c.mu.Unlock()
	closeAll(victims)
	if over {
		c.log.Warn("models in use exceed the memory budget", "budget", c.budget, "model", key.String())
	}
	return &Ref{c: c, e: e}, nil
}

func (c *Cache) touch(e *entry) {
	c.tick++
	e.lastUsed = c.tick
}

func (c *Cache) usedLocked() int64 {
	var n int64
	for _, e := range c.entries {
		n += e.bytes
	}
	return n
}

// evictLocked removes idle loaded models, least recently used first, until the
// cache fits its budget; keep is never chosen. The caller closes the victims
// outside the lock.
func (c *Cache) evictLocked(keep *entry) []*entry {
	if c.budget <= 0 {
		return nil
	}
	used := c.usedLocked()
	if used <= c.budget {
		return nil
	}
	var idle []*entry
	for _, e := range c.entries {
		if e != keep && e.refs == 0 && e.loaded() {
			idle = append(idle, e)
		}
	}
	sort.Slice(idle, func(i, j int) bool { return idle[i].lastUsed < idle[j].lastUsed })
	var victims []*entry
	for _, e := range idle {
		if used <= c.budget {
			break
		}
		delete(c.entries, e.key)
		used -= e.bytes
		c.stats.Evictions++
		victims = append(victims, e)
		c.log.Info("evicting model", "path", e.key.Path, "bytes", e.bytes)
	}
	return victims
}

func closeAll(es []*entry) {
	for _, e := range es {
		e.close()
	}
}

func (c *Cache) release(e *entry) {
	c.mu.Lock()
	e.refs--
	c.touch(e)
	var victims []*entry
	if c.closed && e.refs == 0 && e.loaded() {
		delete(c.entries, e.key)
		victims = []*entry{e}
	} else {
		victims = c.evictLocked(nil)
	}
	c.mu.Unlock()
	closeAll(victims)
}

// Unload frees the model for key if it is loaded and idle. It reports whether
// a model was freed.
func (c *Cache) Unload(key Key) (bool, error) {
	c.mu.Lock()
	e, ok := c.entries[key]
	if !ok {
		c.mu.Unlock()
		return false, nil
	}
	if e.refs > 0 || !e.loaded() {
		c.mu.Unlock()
		return false, fmt.Errorf("unload %s: %w", key.Path, ErrInUse)
	}
	delete(c.entries, key)
	c.mu.Unlock()
	e.close()
	return true, nil
}

// LoadedModel describes one cache entry.
type LoadedModel struct {
	Key  Key               `json:"-"`
	Kind string            `json:"kind"`
	Path string            `json:"path"`
	Info binding.ModelInfo `json:"info"`
	Refs int               `json:"in_use"`
}

// Loaded lists the loaded models, most recently used first.
func (c *Cache) Loaded() []LoadedModel {
	c.mu.Lock()
	defer c.mu.Unlock()
	var es []*entry
	for _, e := range c.entries {
		if e.loaded() {
			es = append(es, e)
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].lastUsed > es[j].lastUsed })
	out := make([]LoadedModel, len(es))
	for i, e := range es {
		out[i] = LoadedModel{Key: e.key, Kind: e.key.Kind.String(), Path: e.key.Path, Info: e.model.Info(), Refs: e.refs}
	}
	return out
}

// Stats reports the cache's counters and memory.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Budget = c.budget
	for _, e := range c.entries {
		if e.loaded() {
			s.Loaded++
			s.BytesInUse += e.bytes
		}
	}
	return s
}

// Close frees every idle model and refuses new requests; models in use are
// freed when their last reference is released.
func (c *Cache) Close() {
	c.mu.Lock()
	c.closed = true
	var victims []*entry
	for k, e := range c.entries {
		if e.refs == 0 && e.loaded() {
			delete(c.entries, k)
			victims = append(victims, e)
		}
	}
	c.mu.Unlock()
	closeAll(victims)
}

// estimateBytes guesses a model's memory before loading it from the size of
// its weight files, scaled to the target dtype (files are usually float32).
func estimateBytes(k Key) int64 {
	var n int64
	_ = filepath.WalkDir(k.Path, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && filepath.Ext(p) == ".safetensors" {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	switch k.DType {
	case binding.F16, binding.BF16:
		n /= 2
	case binding.Q8_0: // 8.5 bits a weight
		n = n * 17 / 64
	case binding.Q5_0: // 5.5
		n = n * 11 / 64
	case binding.Q4_0: // 4.5
		n = n * 9 / 64
	}
	return n
}
