-- wrk script: rotate over a pool of pre-created session cookies (one per line in the file given
-- as the first script argument), so every request is a returning visitor.
-- usage: wrk ... -s bench/sessions.lua URL -- cookies.txt /count
local cookies = {}
local i = 0
local path = "/"

function init(args)
  for line in io.lines(args[1]) do
    cookies[#cookies + 1] = line
  end
  path = args[2] or "/"
  -- Different threads start at different places in the pool.
  i = math.random(#cookies)
end

function request()
  i = i % #cookies + 1
  return wrk.format("GET", path, { ["Cookie"] = "sessionid=" .. cookies[i], ["X-Bench-Expect"] = "existing" })
end
