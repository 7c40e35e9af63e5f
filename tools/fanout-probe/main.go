// fanout-probe: N NATS connections, each authenticated as its own node-loader (its nkey
// seed, the server's CA, and with mutual TLS its client certificate), all subscribed to
// one core subject (the republished snapshot). For every message it records when each
// connection received it (CLOCK_REALTIME ns), keyed by the message's Nats-Sequence header
// (the KV revision), so the caller can subtract its own write times.
//
// Usage: fanout-probe SPEC.json. Events are JSON lines on stdout:
//
//	{"event":"ready", ...}     every connection is connected and subscribed (or gave up)
//	{"event":"complete", ...}  every connected subscriber has received this sequence
//	{"event":"result", ...}    the receive times, once stdin closes or the deadline passes
//
// Bounded: connects at most `parallel` at a time, each within `connect_timeout_s`, and ends
// by itself `deadline_s` after it started, whatever its caller does.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

type connectionSpec struct {
	URL         string `json:"url"`
	Name        string `json:"name"`
	SeedFile    string `json:"seed_file"`
	CAFile      string `json:"ca_file"`
	Cert        string `json:"cert"`
	Key         string `json:"key"`
	InboxPrefix string `json:"inbox_prefix"`
}

type spec struct {
	Subject         string           `json:"subject"`
	Connections     []connectionSpec `json:"connections"`
	Parallel        int              `json:"parallel"`
	ConnectTimeoutS float64          `json:"connect_timeout_s"`
	DeadlineS       float64          `json:"deadline_s"`
}

// received: per connection, sequence -> receive time (ns since the epoch).
type received struct {
	mu        sync.Mutex
	bySeq     []map[uint64]int64
	counts    map[uint64]int
	connected int
	out       *events
}

func (r *received) record(index int, seq uint64, at int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, seen := r.bySeq[index][seq]; seen {
		return
	}
	r.bySeq[index][seq] = at
	r.counts[seq]++
	if r.counts[seq] == r.connected {
		r.out.emit(map[string]any{"event": "complete", "seq": seq, "at_ns": at})
	}
}

type events struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (e *events) emit(value any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.enc.Encode(value); err != nil {
		fmt.Fprintf(os.Stderr, "fanout-probe: cannot write an event: %v\n", err)
	}
}

func options(c connectionSpec, timeout time.Duration, asyncErrors func(string)) ([]nats.Option, error) {
	opts := []nats.Option{
		nats.Name(c.Name),
		nats.Timeout(timeout),
		nats.MaxReconnects(-1),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			asyncErrors(err.Error())
		}),
	}
	if c.SeedFile != "" {
		nkey, err := nats.NkeyOptionFromSeed(c.SeedFile)
		if err != nil {
			return nil, fmt.Errorf("%s: seed %s: %w", c.Name, c.SeedFile, err)
		}
		opts = append(opts, nkey)
	}
	if c.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(c.InboxPrefix))
	}
	if c.CAFile != "" || c.Cert != "" {
		// The server's config has handshake_first: TLS before any NATS protocol.
		opts = append(opts, nats.TLSHandshakeFirst())
		if c.CAFile != "" {
			opts = append(opts, nats.RootCAs(c.CAFile))
		}
		if c.Cert != "" {
			opts = append(opts, nats.ClientCert(c.Cert, c.Key))
		}
	}
	return opts, nil
}

type prober struct {
	spec   spec
	got    *received
	out    *events
	errMu  sync.Mutex
	errors map[string]int
	conns  []*nats.Conn
}

func (p *prober) noteError(text string) {
	p.errMu.Lock()
	defer p.errMu.Unlock()
	p.errors[text]++
}

func (p *prober) connectOne(index int) {
	c := p.spec.Connections[index]
	timeout := time.Duration(p.spec.ConnectTimeoutS * float64(time.Second))
	opts, err := options(c, timeout, p.noteError)
	if err != nil {
		p.noteError(err.Error())
		return
	}
	conn, err := nats.Connect(c.URL, opts...)
	if err != nil {
		p.noteError(fmt.Sprintf("connect: %v", err))
		return
	}
	_, err = conn.Subscribe(p.spec.Subject, func(msg *nats.Msg) {
		at := time.Now().UnixNano()
		seq, perr := strconv.ParseUint(msg.Header.Get("Nats-Sequence"), 10, 64)
		if perr != nil {
			p.noteError("a message without a Nats-Sequence header")
			return
		}
		p.got.record(index, seq, at)
	})
	if err == nil {
		// The server has the subscription once the flush's PONG is back.
		err = conn.FlushTimeout(timeout)
	}
	if err == nil {
		err = conn.LastError() // a permissions violation arrives as an async -ERR
	}
	if err != nil {
		p.noteError(fmt.Sprintf("subscribe: %v", err))
		conn.Close()
		return
	}
	p.conns[index] = conn
}

func (p *prober) connectAll() {
	parallel := max(p.spec.Parallel, 1)
	work := make(chan int)
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for index := range work {
				p.connectOne(index)
			}
		}()
	}
	for index := range p.spec.Connections {
		work <- index
	}
	close(work)
	wg.Wait()
}

func (p *prober) result() map[string]any {
	p.got.mu.Lock()
	defer p.got.mu.Unlock()
	// sequence -> one receive time per connection, 0 where it never arrived.
	deliveries := map[string][]int64{}
	for seq := range p.got.counts {
		times := make([]int64, len(p.spec.Connections))
		for index, bySeq := range p.got.bySeq {
			times[index] = bySeq[seq]
		}
		deliveries[strconv.FormatUint(seq, 10)] = times
	}
	subscribed := make([]bool, len(p.conns))
	for index, conn := range p.conns {
		subscribed[index] = conn != nil
	}
	p.errMu.Lock()
	defer p.errMu.Unlock()
	return map[string]any{
		"subscribed":  subscribed,
		"event":       "result",
		"connections": len(p.spec.Connections),
		"connected":   p.got.connected,
		"errors":      p.errors,
		"deliveries":  deliveries,
	}
}

func readSpec(path string) (spec, error) {
	var s spec
	data, err := os.ReadFile(path)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("%s: %w", path, err)
	}
	if s.Subject == "" || len(s.Connections) == 0 {
		return s, fmt.Errorf("%s: needs a subject and at least one connection", path)
	}
	if s.ConnectTimeoutS <= 0 {
		s.ConnectTimeoutS = 10
	}
	if s.DeadlineS <= 0 {
		s.DeadlineS = 600
	}
	return s, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: fanout-probe SPEC.json")
		os.Exit(2)
	}
	s, err := readSpec(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "fanout-probe: %v\n", err)
		os.Exit(2)
	}
	began := time.Now()
	deadline := time.After(time.Duration(s.DeadlineS * float64(time.Second)))
	out := &events{enc: json.NewEncoder(os.Stdout)} // unbuffered: one write per event
	got := &received{bySeq: make([]map[uint64]int64, len(s.Connections)), counts: map[uint64]int{}, out: out}
	for i := range got.bySeq {
		got.bySeq[i] = map[uint64]int64{}
	}
	p := &prober{spec: s, got: got, out: out, errors: map[string]int{}, conns: make([]*nats.Conn, len(s.Connections))}
	p.connectAll()
	connected := 0
	for _, conn := range p.conns {
		if conn != nil {
			connected++
		}
	}
	got.mu.Lock()
	got.connected = connected
	got.mu.Unlock()
	out.emit(map[string]any{
		"event": "ready", "connected": connected, "connections": len(s.Connections),
		"connect_s": time.Since(began).Seconds(),
	})
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stdinClosed)
	}()
	select {
	case <-stdinClosed:
	case <-deadline:
		p.noteError("deadline passed before stdin closed")
	}
	for _, conn := range p.conns {
		if conn != nil {
			conn.Close()
		}
	}
	out.emit(p.result())
}
