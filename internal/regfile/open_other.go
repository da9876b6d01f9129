//go:build !unix

package regfile

import "os"

// openNonblocking opens normally where O_NONBLOCK does not exist; Open's
// checks before and after still refuse what is not a regular file.
func openNonblocking(path string) (*os.File, error) {
	return os.Open(path)
}
