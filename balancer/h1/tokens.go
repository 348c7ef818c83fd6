package h1

import "bytes"

// HasToken reports whether the comma-separated list v holds tok, whatever
// its case.
func HasToken(v, tok []byte) bool {
	for len(v) > 0 {
		var t []byte
		t, v, _ = bytes.Cut(v, strComma)
		if bytes.EqualFold(bytes.TrimSpace(t), tok) {
			return true
		}
	}
	return false
}
