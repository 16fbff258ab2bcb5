-- wrk script: POST a rotating set of prepared requests and print the results as one JSON line.
-- Argument (after `--`): a manifest, one request per line, tab-separated:
--   path <TAB> body file <TAB> header name <TAB> header value [<TAB> name <TAB> value ...]
local requests = {}
local next_index = 0

local function split_tabs(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do
    fields[#fields + 1] = field
  end
  return fields
end

function init(args)
  local manifest = assert(io.open(args[1], "r"))
  for line in manifest:lines() do
    if #line > 0 then
      local f = split_tabs(line)
      local body_file = assert(io.open(f[2], "rb"))
      local body = body_file:read("*a")
      body_file:close()
      local headers = {}
      for i = 3, #f - 1, 2 do
        headers[f[i]] = f[i + 1]
      end
      requests[#requests + 1] = wrk.format("POST", f[1], headers, body)
    end
  end
  manifest:close()
  assert(#requests > 0, "empty manifest")
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us": %d, "requests": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "min_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.min, latency.max, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
