-- wrk script: post.lua's requests, each connection pausing an exponential think time (mean: the
-- second argument, in ms) between an answer and its next request. With many connections and think
-- times long beside the answers, the arrivals are close to Poisson at connections / mean think:
-- open loop enough to offer a server more than it can serve (Debian has no wrk2).
local source = debug.getinfo(1, "S").source:sub(2)
dofile(source:match("(.*/)") .. "post.lua")

local mean_ms = 0
local load_manifest = init

function init(args)
  load_manifest(args)
  mean_ms = tonumber(args[2])
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function delay()
  return math.floor(-mean_ms * math.log(1 - math.random()) + 0.5)
end
