-- wrk script: post.lua's requests, each connection pausing an exponential think time (mean: the
-- second argument, in ms) between an answer and its next request. With many connections and think
-- times long beside the answers, the arrivals are close to Poisson at connections / mean think:
-- open loop enough to offer a server more than it can serve (Debian has no wrk2).
-- Each 200's `Server-Timing` total (the server's own time for it) and queue time are counted in
-- 0.5 ms steps, and printed as `WRKADMITTED {"step_ms": 0.5, "counts": {"step": n, ...}, "queued":
-- {...}}`: the Prometheus histograms' buckets are too coarse to judge a latency bound such as
-- 100 ms + one batch.
local source = debug.getinfo(1, "S").source:sub(2)
dofile(source:match("(.*/)") .. "post.lua")

local mean_ms = 0
local load_manifest = init
local print_totals = done
local threads = {}
admitted, queued = {}, {}  -- read by done() through thread:get, so global

local function count(steps, ms)
  local step = math.floor(tonumber(ms) * 2)
  steps[step] = (steps[step] or 0) + 1
end

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  load_manifest(args)
  mean_ms = tonumber(args[2])
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function delay()
  return math.floor(-mean_ms * math.log(1 - math.random()) + 0.5)
end

function response(status, headers, body)
  if status == 200 then
    local timing = headers["server-timing"] or headers["Server-Timing"]
    local total = timing and timing:match("total;dur=([%d.]+)")
    if total then
      count(admitted, total)
      count(queued, timing:match("queue;dur=([%d.]+)") or 0)
    end
  end
end

function done(summary, latency, requests_)
  print_totals(summary, latency, requests_)
  local function merged(name)
    local counts, parts = {}, {}
    for _, thread in ipairs(threads) do
      for step, n in pairs(thread:get(name)) do
        counts[step] = (counts[step] or 0) + n
      end
    end
    for step, n in pairs(counts) do
      parts[#parts + 1] = string.format('"%d": %d', step, n)
    end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  io.write('WRKADMITTED {"step_ms": 0.5, "counts": ' .. merged("admitted") .. ', "queued": ' ..
           merged("queued") .. '}\n')
end
