package h1

import "bytes"

// ScanChunked looks at the chunked body at the start of b: it returns the
// decoded length and the length of b the body takes, final CRLF included.
// It says Incomplete until the body is all there, and HandOff for a
// malformed body, one with trailer fields or one decoding to more than max
// bytes.
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
		if bytes.IndexByte(line, '\r') >= 0 {
			// A bare CR, which some parsers take for a line's end.
			return 0, 0, HandOff
		}
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			// Chunk extensions, dropped. fasthttp refuses whitespace
			// between the size and them, so the size is parsed untrimmed.
			line = line[:i]
		} else {
			line = bytes.TrimRight(line, " \t")
		}
		size, ok := parseChunkSize(line)
		if !ok || bodyLen+size > max {
			return 0, 0, HandOff
		}
		if size == 0 {
			// The blank line. A trailer section goes to the fasthttp
			// path, which checks its fields by a list of its own: rare
			// in answers to a GET, and not worth a second list here.
			switch {
			case len(b)-off < 2:
				if len(b) > off && b[off] != '\r' {
					return 0, 0, HandOff
				}
				return 0, 0, Incomplete
			case b[off] != '\r' || b[off+1] != '\n':
				return 0, 0, HandOff
			}
			return bodyLen, off + 2, Forward
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
