package binding

import (
	"os"
	"sync"
)

// threadPoolEnv is the environment Load gives the engine's thread pools, unless
// the process already sets a variable itself. libtorch's CPU kernels run on two
// pools at once: OpenMP's (oneDNN convolutions, elementwise ops) and, where
// libtorch calls an OpenBLAS built with pthreads (Debian's), OpenBLAS's own for
// float32 matrix products. Idle threads of each spin for the next task by
// default — libgomp for 300000 rounds, OpenBLAS for about 2^28 cycles — and
// take the cores the other pool is working on: on 2 cores a float32 UNet step
// spent a third of its CPU time spinning and yielding. Shorter spins let each
// pool sleep while the other works; the variables are read once, when the
// libraries load, so they must be in the C environment before the first
// Dlopen. docs/engine.md "Threads" has the measurement.
var threadPoolEnv = []struct{ Name, Value string }{
	{"GOMP_SPINCOUNT", "10000"},
	{"OPENBLAS_THREAD_TIMEOUT", "4"},
}

var setThreadPoolEnv sync.Once

// applyThreadPoolEnv sets every threadPoolEnv variable the environment does not
// already set. purego's runtime passes os.Setenv on to the C environment,
// where libgomp and OpenBLAS read it.
func applyThreadPoolEnv() {
	setThreadPoolEnv.Do(func() {
		for _, v := range threadPoolEnv {
			if _, set := os.LookupEnv(v.Name); !set {
				os.Setenv(v.Name, v.Value)
			}
		}
	})
}
