package models

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// scanPickle walks the pickle program at the start of b without running it
// and returns its length, through STOP. It is what makes handing the program
// to gopickle safe: gopickle allocates whatever a length field says before
// reading, indexes past its opcode table on 0xff, parses numbers of any
// length (quadratic for big ints), panics on odd DICT/SETITEMS counts and on
// zero-length LONG1/LONG4, and hashes set members and dict keys (a bytes key
// panics). So every length is checked against the bytes that are there and
// against MaxPickleLine/MaxPickleNumber, the stack is simulated (counts only)
// so that every pop has something to pop and marks nest at most
// MaxPickleDepth deep, and opcodes a state dict never uses — object
// construction, extensions, bytes, sets, out-of-band buffers — are refused.
func scanPickle(b []byte) (int, error) {
	bad := func(pos int, format string, args ...any) error {
		return fmt.Errorf("%w: pickle byte %d: %s", ErrBadCheckpoint, pos, fmt.Sprintf(format, args...))
	}
	stack := 0      // items above the innermost mark
	var marks []int // items below each open mark
	need := func(pos, n int) error {
		if stack < n {
			return bad(pos, "opcode needs %d stack items, %d there", n, stack)
		}
		return nil
	}
	popMark := func(pos int) (int, error) {
		if len(marks) == 0 {
			return 0, bad(pos, "no mark to pop")
		}
		items := stack
		stack = marks[len(marks)-1]
		marks = marks[:len(marks)-1]
		return items, nil
	}
	// line returns the length of a newline-terminated argument at p,
	// newline included.
	line := func(p, limit int) (int, error) {
		end := min(len(b), p+limit+1)
		i := bytes.IndexByte(b[p:end], '\n')
		if i < 0 {
			if end == len(b) {
				return 0, bad(p, "truncated text argument")
			}
			return 0, bad(p, "text argument longer than %d bytes", limit)
		}
		return i + 1, nil
	}
	// counted returns the length of a counted argument of n bytes at p.
	counted := func(p int, n uint64, limit uint64) (int, error) {
		if n > limit {
			return 0, bad(p, "argument of %d bytes, over the %d allowed", n, limit)
		}
		if n > uint64(len(b)-p) {
			return 0, bad(p, "argument of %d bytes past the end of the pickle", n)
		}
		return int(n), nil
	}
	fixed := func(p, n int) error {
		if len(b)-p < n {
			return bad(p, "truncated argument")
		}
		return nil
	}

	pos := 0
	for pos < len(b) {
		op := b[pos]
		at := pos
		p := pos + 1
		var err error
		arg := 0 // argument bytes after the opcode
		switch op {
		case '(': // MARK
			if len(marks) >= MaxPickleDepth {
				return 0, bad(at, "marks nest more than %d deep", MaxPickleDepth)
			}
			marks = append(marks, stack)
			stack = 0
		case '.': // STOP
			if err := need(at, 1); err != nil {
				return 0, err
			}
			return p, nil
		case '0': // POP: gopickle pops a mark when the stack above it is empty
			if stack == 0 {
				_, err = popMark(at)
			} else {
				stack--
			}
		case '1': // POP_MARK
			_, err = popMark(at)
		case '2': // DUP
			if err = need(at, 1); err == nil {
				stack++
			}
		case 'N', 0x88, 0x89, ')', ']', '}': // None, True, False, empty containers
			stack++
		case 'K', 'h': // BININT1, BINGET
			if err = fixed(p, 1); err == nil {
				arg, stack = 1, stack+1
			}
		case 'M': // BININT2
			if err = fixed(p, 2); err == nil {
				arg, stack = 2, stack+1
			}
		case 'J', 'j': // BININT, LONG_BINGET
			if err = fixed(p, 4); err == nil {
				arg, stack = 4, stack+1
			}
		case 'G': // BINFLOAT
			if err = fixed(p, 8); err == nil {
				arg, stack = 8, stack+1
			}
		case 'I', 'L', 'F', 'g': // INT, LONG, FLOAT, GET: decimal text
			if arg, err = line(p, MaxPickleNumber); err == nil {
				stack++
			}
		case 'S', 'V', 'P': // STRING, UNICODE, PERSID
			if arg, err = line(p, MaxPickleLine); err == nil {
				stack++
			}
		case 'c': // GLOBAL: module and name lines
			var n1, n2 int
			if n1, err = line(p, MaxPickleLine); err == nil {
				if n2, err = line(p+n1, MaxPickleLine); err == nil {
					arg, stack = n1+n2, stack+1
				}
			}
		case 'U', 0x8c: // SHORT_BINSTRING, SHORT_BINUNICODE
			if err = fixed(p, 1); err == nil {
				var n int
				if n, err = counted(p+1, uint64(b[p]), 255); err == nil {
					arg, stack = 1+n, stack+1
				}
			}
		case 'T': // BINSTRING: signed length
			if err = fixed(p, 4); err == nil {
				l := int32(binary.LittleEndian.Uint32(b[p:]))
				if l < 0 {
					err = bad(at, "negative string length %d", l)
					break
				}
				var n int
				if n, err = counted(p+4, uint64(l), MaxPickleBytes); err == nil {
					arg, stack = 4+n, stack+1
				}
			}
		case 'X': // BINUNICODE
			if err = fixed(p, 4); err == nil {
				var n int
				if n, err = counted(p+4, uint64(binary.LittleEndian.Uint32(b[p:])), MaxPickleBytes); err == nil {
					arg, stack = 4+n, stack+1
				}
			}
		case 0x8d: // BINUNICODE8
			if err = fixed(p, 8); err == nil {
				var n int
				if n, err = counted(p+8, binary.LittleEndian.Uint64(b[p:]), MaxPickleBytes); err == nil {
					arg, stack = 8+n, stack+1
				}
			}
		case 0x8a: // LONG1
			if err = fixed(p, 1); err == nil {
				if b[p] == 0 {
					err = bad(at, "empty LONG1")
					break
				}
				var n int
				if n, err = counted(p+1, uint64(b[p]), MaxPickleNumber); err == nil {
					arg, stack = 1+n, stack+1
				}
			}
		case 0x8b: // LONG4: signed length
			if err = fixed(p, 4); err == nil {
				l := int32(binary.LittleEndian.Uint32(b[p:]))
				if l <= 0 {
					err = bad(at, "LONG4 of %d bytes", l)
					break
				}
				var n int
				if n, err = counted(p+4, uint64(l), MaxPickleNumber); err == nil {
					arg, stack = 4+n, stack+1
				}
			}
		case 0x80: // PROTO
			if err = fixed(p, 1); err == nil {
				if b[p] > 5 {
					err = bad(at, "pickle protocol %d", b[p])
					break
				}
				arg = 1
			}
		case 0x95: // FRAME: the frame is the opcodes that follow
			if err = fixed(p, 8); err == nil {
				if binary.LittleEndian.Uint64(b[p:]) > uint64(len(b)-p-8) {
					err = bad(at, "frame past the end of the pickle")
					break
				}
				arg = 8
			}
		case 'p': // PUT: decimal text
			if err = need(at, 1); err == nil {
				arg, err = line(p, MaxPickleNumber)
			}
		case 'q': // BINPUT
			if err = need(at, 1); err == nil {
				if err = fixed(p, 1); err == nil {
					arg = 1
				}
			}
		case 'r': // LONG_BINPUT
			if err = need(at, 1); err == nil {
				if err = fixed(p, 4); err == nil {
					arg = 4
				}
			}
		case 0x94, 'Q', 0x85: // MEMOIZE, BINPERSID, TUPLE1: one in, one out
			err = need(at, 1)
		case 'R', 'a', 'b', 0x86, 0x93: // REDUCE, APPEND, BUILD, TUPLE2, STACK_GLOBAL
			if err = need(at, 2); err == nil {
				stack--
			}
		case 0x87: // TUPLE3
			if err = need(at, 3); err == nil {
				stack -= 2
			}
		case 's': // SETITEM
			if err = need(at, 3); err == nil {
				stack -= 2
			}
		case 't', 'l': // TUPLE, LIST
			if _, err = popMark(at); err == nil {
				stack++
			}
		case 'd': // DICT
			var items int
			if items, err = popMark(at); err == nil {
				if items%2 != 0 {
					err = bad(at, "DICT of %d items, not key/value pairs", items)
					break
				}
				stack++
			}
		case 'e': // APPENDS: the list below the mark stays
			if _, err = popMark(at); err == nil {
				err = need(at, 1)
			}
		case 'u': // SETITEMS: the dict below the mark stays
			var items int
			if items, err = popMark(at); err == nil {
				if items%2 != 0 {
					err = bad(at, "SETITEMS of %d items, not key/value pairs", items)
					break
				}
				err = need(at, 1)
			}
		case 'i', 'o', 0x81, 0x92, 0x82, 0x83, 0x84:
			return 0, fmt.Errorf("%w: pickle byte %d: opcode 0x%02x builds arbitrary objects", ErrUnsafePickle, at, op)
		case 'B', 'C', 0x8e, 0x96, 0x8f, 0x90, 0x91, 0x97, 0x98:
			return 0, fmt.Errorf("%w: pickle byte %d: opcode 0x%02x makes bytes, sets or buffers", ErrUnsafePickle, at, op)
		default:
			return 0, bad(at, "unknown opcode 0x%02x", op)
		}
		if err != nil {
			return 0, err
		}
		pos = p + arg
	}
	return 0, fmt.Errorf("%w: pickle ends without STOP", ErrBadCheckpoint)
}
