// Package regfile opens the files a user names — model weights, configs,
// images — only when they are regular files. Reading a FIFO blocks until a
// writer comes, a device can stream forever and a directory cannot be read:
// given as a path, each must fail at once with a clear error instead.
package regfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// ErrNotRegular is returned for a path that names a FIFO, device, socket or
// directory where a regular file is expected.
var ErrNotRegular = errors.New("not a regular file")

// ErrTooLarge is returned by ReadFile for a file over its size limit.
var ErrTooLarge = errors.New("file too large")

// Check returns path's FileInfo (following symlinks) if it is a regular file,
// without opening it.
func Check(path string) (fs.FileInfo, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, notRegular(path, info.Mode())
	}
	return info, nil
}

// Open opens path for reading if it is a regular file. It checks before
// opening, opens without blocking (a FIFO swapped in after the check still
// cannot block the open) and checks the opened file again.
func Open(path string) (*os.File, fs.FileInfo, error) {
	if _, err := Check(path); err != nil {
		return nil, nil, err
	}
	f, err := openNonblocking(path)
	if err != nil {
		return nil, nil, err
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if !info.Mode().IsRegular() {
		f.Close()
		return nil, nil, notRegular(path, info.Mode())
	}
	return f, info, nil
}

// ReadFile reads a regular file whole. A file larger than max bytes is
// refused with ErrTooLarge before anything is read (max <= 0: no limit).
func ReadFile(path string, max int64) ([]byte, error) {
	f, info, err := Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size := info.Size()
	if max > 0 && size > max {
		return nil, fmt.Errorf("%s: %w (%d bytes, the limit is %d)", path, ErrTooLarge, size, max)
	}
	// The size is only a hint: the file may change while it is read. The
	// limit holds for what is actually read.
	limit := size + 1
	if max > 0 {
		limit = max + 1
	}
	b, err := io.ReadAll(io.LimitReader(f, limit))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if max > 0 && int64(len(b)) > max {
		return nil, fmt.Errorf("%s: %w (the limit is %d bytes)", path, ErrTooLarge, max)
	}
	if max <= 0 && int64(len(b)) > size {
		// Grew while being read: read the rest too.
		rest, err := io.ReadAll(f)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		b = append(b, rest...)
	}
	return b, nil
}

func notRegular(path string, mode fs.FileMode) error {
	kind := "special file"
	switch {
	case mode.IsDir():
		kind = "directory"
	case mode&fs.ModeNamedPipe != 0:
		kind = "FIFO"
	case mode&fs.ModeSocket != 0:
		kind = "socket"
	case mode&fs.ModeCharDevice != 0:
		kind = "character device"
	case mode&fs.ModeDevice != 0:
		kind = "device"
	}
	return fmt.Errorf("%s: %w (it is a %s)", path, ErrNotRegular, kind)
}
