// Package traefikplugin is the part of authgate's Traefik setup that Traefik has no
// built-in middleware for. It runs in two places of a router's chain, named by Stage:
//
//	guard    (before forwardAuth) gives authgate Timeout to answer and turns forwardAuth's own
//	         failure (authgate unreachable or too slow: an empty 500) into 503 UNAVAILABLE
//	         with authgate's JSON error body. authgate's own answers pass unchanged.
//	forward  (after forwardAuth and the headers middleware) sends the upstream the URI
//	         authgate judged, from the header its 200 carries (URIHeader, copied onto the
//	         request by forwardAuth's authResponseHeaders), and removes QueryParameters
//	         (the token parameters, pwt) from the query whatever it came from.
//
// forwardAuth deletes a client's copy of every authResponseHeaders entry before it copies
// authgate's, so a URIHeader that is present came from authgate; when it is missing, no
// decision was made and the request is answered 503 instead of forwarded.
package traefikplugin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Config is the plugin's configuration (a Middleware's spec.plugin.authgate).
type Config struct {
	Stage           string   `json:"stage,omitempty"`
	Timeout         string   `json:"timeout,omitempty"`
	URIHeader       string   `json:"uriHeader,omitempty"`
	QueryParameters []string `json:"queryParameters,omitempty"`
}

// CreateConfig is the configuration before Traefik applies the Middleware's settings.
func CreateConfig() *Config {
	return &Config{Timeout: "2s"}
}

// The body authgate itself sends when it cannot decide, so clients see one error shape.
const unavailableBody = `{"error":{"code":"UNAVAILABLE","message":"The authorization service is unavailable; try again shortly.","details":{}}}`

// New builds the stage the configuration names.
func New(ctx context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	switch config.Stage {
	case "guard":
		timeout, err := time.ParseDuration(config.Timeout)
		if err != nil || timeout <= 0 {
			return nil, fmt.Errorf("%s: timeout %q is not a positive duration", name, config.Timeout)
		}
		return &guard{next: next, timeout: timeout}, nil
	case "forward":
		if config.URIHeader == "" && len(config.QueryParameters) == 0 {
			return nil, fmt.Errorf("%s: stage forward needs uriHeader or queryParameters", name)
		}
		drop := make(map[string]bool, len(config.QueryParameters))
		for _, p := range config.QueryParameters {
			drop[strings.ToLower(p)] = true
		}
		return &forward{next: next, uriHeader: http.CanonicalHeaderKey(config.URIHeader), drop: drop}, nil
	}
	return nil, fmt.Errorf("%s: stage must be guard or forward, not %q", name, config.Stage)
}

type contextKey string

const judgementKey contextKey = "authgate-judgement"

// judgement is shared by the guard and the forward stage of one request.
type judgement struct {
	mu      sync.Mutex
	passed  bool // the forward stage was reached: forwardAuth allowed the request
	expired bool // authgate did not answer in time; the request was cancelled
	timer   *time.Timer
}

// pass marks the request as allowed; false when the guard's timeout came first.
func (j *judgement) pass() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.expired {
		return false
	}
	j.passed = true
	if j.timer != nil {
		j.timer.Stop()
	}
	return true
}

func (j *judgement) allowed() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.passed
}

type guard struct {
	next    http.Handler
	timeout time.Duration
}

func (g *guard) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	ctx, cancel := context.WithCancel(req.Context())
	defer cancel()
	j := &judgement{}
	j.mu.Lock()
	j.timer = time.AfterFunc(g.timeout, func() {
		j.mu.Lock()
		if !j.passed {
			j.expired = true
			cancel() // forwardAuth's call to authgate returns at once
		}
		j.mu.Unlock()
	})
	j.mu.Unlock()
	defer j.timer.Stop()
	w := &guardWriter{rw: rw, j: j}
	g.next.ServeHTTP(w, req.WithContext(context.WithValue(ctx, judgementKey, j)))
}

// guardWriter passes every response through, except forwardAuth's own failure before the
// request was allowed: a 5xx (or Traefik's 499 after the guard cancelled the call) without
// a Content-Type, which authgate's answers always have. Answers given before the request
// was allowed (authgate's denials) are marked Cache-Control: no-store.
type guardWriter struct {
	rw       http.ResponseWriter
	j        *judgement
	replaced bool
	wrote    bool
}

func (w *guardWriter) Header() http.Header { return w.rw.Header() }

func (w *guardWriter) WriteHeader(status int) {
	if w.wrote {
		return
	}
	w.wrote = true
	if !w.j.allowed() {
		if (status >= 500 || status == 499) && w.rw.Header().Get("Content-Type") == "" {
			w.replaced = true
			unavailable(w.rw)
			return
		}
		w.rw.Header().Set("Cache-Control", "no-store")
	}
	w.rw.WriteHeader(status)
}

func (w *guardWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	if w.replaced {
		return len(b), nil
	}
	return w.rw.Write(b)
}

func (w *guardWriter) Flush() {
	if f, ok := w.rw.(http.Flusher); ok && !w.replaced {
		f.Flush()
	}
}

func (w *guardWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if h, ok := w.rw.(http.Hijacker); ok {
		return h.Hijack()
	}
	return nil, nil, errors.New("authgate guard: the response writer cannot be hijacked")
}

func unavailable(rw http.ResponseWriter) {
	h := rw.Header()
	for name := range h {
		delete(h, name)
	}
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", fmt.Sprint(len(unavailableBody)))
	rw.WriteHeader(http.StatusServiceUnavailable)
	_, _ = rw.Write([]byte(unavailableBody))
}

type forward struct {
	next      http.Handler
	uriHeader string
	drop      map[string]bool
}

func (f *forward) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if j, ok := req.Context().Value(judgementKey).(*judgement); ok && !j.pass() {
		unavailable(rw)
		return
	}
	if f.uriHeader != "" {
		judged := req.Header.Get(f.uriHeader)
		req.Header.Del(f.uriHeader)
		u, err := url.ParseRequestURI(judged)
		if err != nil || !strings.HasPrefix(judged, "/") || u.Host != "" {
			unavailable(rw) // no decision carried the URI: never forward the client's own
			return
		}
		req.URL.Path, req.URL.RawPath, req.URL.RawQuery = u.Path, u.RawPath, u.RawQuery
	}
	if len(f.drop) > 0 && req.URL.RawQuery != "" {
		req.URL.RawQuery = f.withoutTokens(req.URL.RawQuery)
	}
	req.URL.ForceQuery = false
	// Traefik's proxy builds the upstream request from RequestURI.
	req.RequestURI = req.URL.RequestURI()
	f.next.ServeHTTP(rw, req)
}

// withoutTokens drops every pair whose name, decoded and in any case, is a token parameter;
// the other pairs are kept byte for byte, in order.
func (f *forward) withoutTokens(query string) string {
	kept := make([]string, 0, 4)
	for _, pair := range strings.Split(query, "&") {
		if pair == "" {
			continue
		}
		name := pair
		if i := strings.IndexByte(pair, '='); i >= 0 {
			name = pair[:i]
		}
		if decoded, err := url.QueryUnescape(name); err == nil {
			name = decoded
		}
		if f.drop[strings.ToLower(strings.TrimSpace(name))] {
			continue
		}
		kept = append(kept, pair)
	}
	return strings.Join(kept, "&")
}
