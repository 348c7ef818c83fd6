package balancer

import "time"

// silentAcceptDelay is how much later than its handshake a connection
// that sends nothing is accepted: TCP_DEFER_ACCEPT's wait.
const silentAcceptDelay = deferAcceptSeconds * time.Second
