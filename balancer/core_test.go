package balancer

import (
	"testing"
	"time"
)

func TestRetryDecisions(t *testing.T) {
	now := time.Now()
	later, earlier := now.Add(time.Second), now.Add(-time.Second)
	f := func(got, want bool, what string) {
		t.Helper()
		if got != want {
			t.Errorf("%s: got %v, want %v", what, got, want)
		}
	}
	f(retryAnswer(true, true, now, later), true, "retryable answer, idempotent, time left")
	f(retryAnswer(true, false, now, later), false, "retryable answer, POST")
	f(retryAnswer(true, true, now, earlier), false, "retryable answer, deadline passed")
	f(retryAnswer(false, true, now, later), false, "final answer")
	f(retryFailure(errTimeout, true, false, now, later), true, "timeout, idempotent")
	f(retryFailure(errTimeout, false, false, now, later), false, "timeout, POST")
	f(retryFailure(errConnectFailed, false, true, now, later), true, "POST never sent")
	f(retryFailure(errConnectFailed, true, true, now, earlier), false, "deadline passed")
	f(retryFailure(errResponseTooLarge, true, false, now, later), false, "response too large")
}
