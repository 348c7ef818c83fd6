package h1

import "bytes"

// ScanChunked looks at the chunked body at the start of b: it returns the
// decoded length and the length of b the body takes, trailers and final
// CRLF included. It says Incomplete until the body is all there, and
// HandOff for a malformed body or one decoding to more than max bytes.
func ScanChunked(b []byte, max int) (bodyLen, n int, v Verdict) {
	off := 0
	for {
		eol := bytes.IndexByte(b[off:], '\n')
		if eol < 0 {
			if len(b)-off > MaxChunkLine {
				return 0, 0, HandOff
			}
			return 0, 0, Incomplete
		}
		line := b[off : off+eol]
		off += eol + 1
		if len(line) == 0 || line[len(line)-1] != '\r' {
			return 0, 0, HandOff
		}
		line = line[:len(line)-1]
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i] // chunk extensions
		}
		size, ok := parseChunkSize(bytes.TrimRight(line, " \t"))
		if !ok || bodyLen+size > max {
			return 0, 0, HandOff
		}
		if size == 0 {
			// Trailer lines, dropped, then the blank line.
			for {
				eol := bytes.IndexByte(b[off:], '\n')
				if eol < 0 {
					return 0, 0, Incomplete
				}
				if eol == 0 || b[off+eol-1] != '\r' {
					return 0, 0, HandOff
				}
				off += eol + 1
				if eol == 1 {
					return bodyLen, off, Forward
				}
			}
		}
		if len(b)-off < size+2 {
			return 0, 0, Incomplete
		}
		if b[off+size] != '\r' || b[off+size+1] != '\n' {
			return 0, 0, HandOff
		}
		bodyLen += size
		off += size + 2
	}
}

// AppendDechunked appends the data of the chunked body b, which
// ScanChunked found complete and well-formed.
func AppendDechunked(dst, b []byte) []byte {
	off := 0
	for {
		eol := bytes.IndexByte(b[off:], '\n')
		line := b[off : off+eol-1]
		off += eol + 1
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i]
		}
		size, _ := parseChunkSize(bytes.TrimRight(line, " \t"))
		if size == 0 {
			return dst
		}
		dst = append(dst, b[off:off+size]...)
		off += size + 2
	}
}

// MaxChunkLine bounds a chunk-size line, extensions included.
const MaxChunkLine = 4096

// parseChunkSize parses a chunk size of at most 8 hex digits.
func parseChunkSize(v []byte) (int, bool) {
	if len(v) == 0 || len(v) > 8 {
		return 0, false
	}
	n := 0
	for _, c := range v {
		switch {
		case c >= '0' && c <= '9':
			n = n<<4 | int(c-'0')
		case c|0x20 >= 'a' && c|0x20 <= 'f':
			n = n<<4 | int(c|0x20-'a'+10)
		default:
			return 0, false
		}
	}
	return n, true
}
