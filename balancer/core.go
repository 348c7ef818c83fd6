package balancer

import (
	"time"

	"github.com/edgelb/edgelb/health"
)

// The forwarding core: what both engines do around a try, in one place.
// The engines do the I/O; how a try counts and what follows it are decided
// here, so that a request gets the same answer, and its backends the same
// books, whichever engine serves it.

// endTry counts one try on b that ended with outcome o after lat: in b's
// health, and in b's metrics, with the status a backend answered (0 when
// it did not) or the code of the failure (errNone when it answered), and
// for a backup that answered, in its service's backup answers.
// Every try of every engine is counted here, once, and recorded in rl,
// its request's record for the access log (nil when it has none).
func endTry(rl *reqLog, b *Backend, now int64, lat time.Duration, o health.Outcome, status int, code errCode) {
	rl.addTry(b, now, lat, tryOutcomeOf(o, status, code), status)
	b.target.Done(now, o, lat)
	b.m.requests.Inc()
	b.m.latency.Update(lat)
	if status > 0 {
		if b.hedge != nil {
			b.hedge.answered(lat)
		}
		b.m.status[statusClass(status)].Inc()
		if o == health.OutcomeOverloaded {
			code = errOverloaded
		}
	}
	if code != errNone {
		b.m.errors[code].Inc()
	}
	if b.backupAnswers != nil && status > 0 {
		b.backupAnswers.Inc()
	}
}

// endLostTry ends a try that lost to another try of its request and was
// left to go on (see hedging); code is how it ended. One that reached its
// deadline unanswered is counted as any try's is: as a timeout, or as a
// connect failure when it was still connecting at connect_timeout. Its
// backend did not answer in time, whether or not the answer was still
// wanted, and a backend that stopped answering (or accepting) must not stay
// healthy on passive checks because hedges keep beating it. Any other end
// (errNone) is uncounted: an answer that came, or a failure after the
// request had its answer, says nothing the winner's backend did not.
func endLostTry(b *Backend, now int64, lat time.Duration, code errCode) {
	switch code {
	case errTimeout:
		endTry(nil, b, now, lat, health.OutcomeTimeout, 0, errTimeout)
	case errConnectFailed:
		endTry(nil, b, now, lat, health.OutcomeConnectFailed, 0, errConnectFailed)
	default:
		b.target.Done(now, health.OutcomeCanceled, 0)
	}
}

// retryAnswer reports whether a request whose try got an answer classified
// retryable goes on to another backend: only an idempotent one, and only
// while its deadline has not passed.
func retryAnswer(retryable, idempotent bool, now, deadline time.Time) bool {
	return retryable && idempotent && now.Before(deadline)
}

// retryFailure reports whether a request whose try failed with code goes on
// to another backend: an idempotent one, or any whose request never left
// (notSent: the connection could not be made, or edgelb's own connection
// limit), while its deadline has not passed. A response too large for
// edgelb would be too large from any backend.
func retryFailure(code errCode, idempotent, notSent bool, now, deadline time.Time) bool {
	return code != errResponseTooLarge && (idempotent || notSent) && now.Before(deadline)
}

// noBackendCode is why a request found no backend for its first try: every
// available backend at its max_inflight cap is overload, anything else is
// no healthy backend.
func (p *Pool) noBackendCode(now int64) errCode {
	if p.maxInflight > 0 && p.atCapacity(now) {
		return errOverloaded
	}
	return errNoHealthyBackend
}

// failureCode is the cause a request that no backend answered is answered
// with (stale copy or generated error), after its last try failed with
// code, t being the backends tried.
func (p *Pool) failureCode(code errCode, t *tried, idempotent bool, now int64) errCode {
	if t.outOfRotation && code != errOverloaded && (idempotent || code == errConnectFailed) {
		// Panic mode tried backends that were out of rotation and none
		// answered: to the client that is still no healthy backend (503
		// or a stale copy), never a 502.
		return errNoHealthyBackend
	}
	if code == errConnectFailed && p.pick(now, &tried{}) == nil {
		// Every backend refused and none is left to try: the pool is
		// known to be down now, which is a 503 (or a stale copy), the
		// same answer the next request gets at once.
		return errNoHealthyBackend
	}
	return code
}

// staleOnAnswer reports whether a backend's answer with status st is
// replaced by a stored copy when there is one (stale_on 500 to 504).
func (p *Pool) staleOnAnswer(st int) bool {
	return st >= 500 && st <= 504 && p.store != nil && p.staleOnStatus[st-500]
}
