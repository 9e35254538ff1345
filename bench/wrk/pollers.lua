-- wrk script: independent pollers. Each connection waits `period_ms` between requests; the first
-- request of each connection waits a random part of one period, so 200 connections are 200
-- dashboards opened at different moments (not 200 tickers firing in the same millisecond).
-- Prints one JSON line at the end: requests, errors, latency percentiles in ms.
-- With a third argument (comma-separated paths) requests take those paths in turn, spreading the
-- pollers over several jobs.
-- wrk -s pollers.lua ... -- <period_ms> [connections per thread] [path,path,...]

local period, started, per_thread = 1000, 0, 0
local paths, next_path = {}, 1

function init(args)
  period = tonumber(args[1] or "1000")
  per_thread = tonumber(args[2] or "0")
  for path in string.gmatch(args[3] or "", "[^,]+") do
    table.insert(paths, path)
  end
  next_path = math.random(1, math.max(#paths, 1))
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6) + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  if #paths == 0 then
    return wrk.format()
  end
  next_path = next_path % #paths + 1
  return wrk.format(nil, paths[next_path])
end

function delay()
  if period <= 0 then
    return 0
  end
  if started < per_thread then
    started = started + 1
    return math.random(0, period)
  end
  return period
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = string.format(
    '{"requests": %d, "duration_s": %.3f, "rps": %.1f, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    e.connect, e.read, e.write, e.status, e.timeout)
  for _, p in ipairs({50, 90, 99, 99.9}) do
    out = out .. string.format(', "p%s_ms": %.2f', tostring(p):gsub("%.", "_"), latency:percentile(p) / 1000)
  end
  out = out .. string.format(', "max_ms": %.2f}', latency.max / 1000)
  io.write("WRK_JSON " .. out .. "\n")
end
