-- wrk script for the IF-METER-004 load figure (docs/benchmarks.md): replays pre-signed
-- requests (`api load-requests`), each once — a nonce used twice is refused by design, so
-- requests are signed ahead rather than in Lua (which has no HMAC).
local reqs = {}
local idx = 0

function init(args)
  local file = os.getenv("API_LOAD_FILE")
  local threads = tonumber(os.getenv("API_LOAD_THREADS"))
  local client = os.getenv("API_LOAD_CLIENT")
  local i = 0
  for line in io.lines(file) do
    if i % threads == id then
      local nonce, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", "/api/v1/push", {
        ["Content-Type"] = "application/json",
        ["X-Client-Id"] = client,
        ["X-Timestamp"] = ts,
        ["X-Nonce"] = nonce,
        ["X-Signature"] = sig,
      }, body)
    end
    i = i + 1
  end
end

local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function request()
  idx = idx + 1
  if idx > #reqs then
    -- Out of signed requests: the replay is refused (401) and shows as non-2xx.
    idx = #reqs
  end
  return reqs[idx]
end
