//go:build unix

package regfile

import (
	"os"
	"syscall"
)

// openNonblocking opens with O_NONBLOCK: on a FIFO the open itself would
// otherwise wait for a writer. Regular files ignore the flag.
func openNonblocking(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
}
