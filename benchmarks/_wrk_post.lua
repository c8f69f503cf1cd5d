-- wrk script of benchmarks/load_test.py: pre-formatted requests, a request bound, status counts.
--
--   wrk -t1 -c32 -d20s --latency -s _wrk_post.lua http://127.0.0.1:PORT -- LIMIT METHOD PATH [BODIES]
--
-- LIMIT: the most responses to read (per wrk thread); when a thread has read that many it stops
-- and interrupts wrk's main thread (SIGINT: wrk then stops every thread and reports), so a run
-- ends at whichever comes first, LIMIT or -d. BODIES: a file with one request body per line
-- (JSON), sent in turn as METHOD PATH with Content-Type: application/json; without it, bodyless
-- requests. done() prints one line "EDGEKD_WRK {json}" with the counts and the latency
-- percentiles and quantiles (microseconds) that wrk recorded for every answered request.

local ffi = require("ffi")
ffi.cdef [[
int kill(int pid, int sig);
int getpid(void);
]]

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- Globals (not locals) of each thread's Lua state, so that done() can read them with thread:get().
function init(args)
  limit = tonumber(args[1])
  local method, path, file = args[2], args[3], args[4]
  reqs = {}
  if file then
    for line in io.lines(file) do
      if #line > 0 then
        reqs[#reqs + 1] = wrk.format(method, path, { ["Content-Type"] = "application/json" }, line)
      end
    end
  else
    reqs[1] = wrk.format(method, path)
  end
  sent, answered, ok, s4xx, s5xx, other = 0, 0, 0, 0, 0, 0
end

function request()
  sent = sent + 1
  return reqs[(sent - 1) % #reqs + 1]
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 then
    ok = ok + 1
  elseif status >= 500 then
    s5xx = s5xx + 1
  elseif status >= 400 then
    s4xx = s4xx + 1
  else
    other = other + 1
  end
  if answered == limit then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2) -- wrk's SIGINT handler ends the run now rather than at -d
  end
end

function done(summary, latency, requests)
  local t = { sent = 0, answered = 0, ok = 0, s4xx = 0, s5xx = 0, other = 0 }
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do
      t[k] = t[k] + (thread:get(k) or 0)
    end
  end
  -- Before the run, wrk calls the first thread's request() once to check the request it returns
  -- (script_verify_request); that request is never sent.
  t.sent = t.sent - 1
  local e = summary.errors
  local pct = {}
  for _, q in ipairs({ 50, 90, 99, 99.9 }) do
    pct[#pct + 1] = string.format('"%s": %d', tostring(q), latency:percentile(q))
  end
  -- The latency distribution as 1000 quantiles (at 0.05%, 0.15%, ... 99.95%), so that runs can be
  -- pooled: each stands for a thousandth of this run's answered requests.
  local quantiles = {}
  if latency.max > 0 then
    for i = 1, 1000 do
      quantiles[i] = string.format("%d", latency:percentile((i - 0.5) / 10))
    end
  end
  io.write(string.format(
    'EDGEKD_WRK {"sent": %d, "answered": %d, "ok": %d, "4xx": %d, "5xx": %d, "other": %d, ' ..
    '"completed": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {%s, "mean": %.1f, "max": %d}, "quantiles_us": [%s]}\n',
    t.sent, t.answered, t.ok, t.s4xx, t.s5xx, t.other, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(pct, ", "), latency.mean, latency.max,
    table.concat(quantiles, ", ")))
end
