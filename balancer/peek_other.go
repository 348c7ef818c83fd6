//go:build !unix

package balancer

// peekClean cannot look at a socket on this platform: the connection is
// taken as clean, and the response checks still apply.
func peekClean(uintptr, []byte) bool { return true }
