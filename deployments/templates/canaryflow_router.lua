-- canaryflow router: the routes live in the shared dict `cf_routes`, so a weight, a canary, shadow mode or the
-- inference key change at runtime through the admin socket, with no nginx reload (a reload resets requests sent
-- on idle keep-alive client connections: shared/FACTS.md). Loaded by nginx.conf.j2; the route table's text format
-- is written by deployments/route_table.py:
--   gen <generation>
--   auth <inference key, or -> 
--   route <model> <stable> <canary, or -> <canary share in basis points 0-10000> <shadow 0|1>
--   batched <model> <version> <TorchServe name of the version's batched twin>
local M = {}

local NAME = "^[A-Za-z0-9_.-]+$"
local TOKEN = "^[A-Za-z0-9._~+/=-]+$"
local dict = ngx.shared.cf_routes
-- Per worker: the table parsed from the text last seen in the dict (strings are interned: `~=` is one compare).
local seen_text, table_ = nil, { gen = "", auth = "", routes = {}, batched = {} }
-- Per worker: requests in flight per "<model>/<version>" of the versions with a batched twin (only this worker's
-- requests touch it, so it needs no lock and starts from zero with the worker).
local in_flight = {}

local function parse(text)
    local t = { gen = nil, auth = "", routes = {}, batched = {} }
    for line in text:gmatch("[^\n]+") do
        local key, rest = line:match("^(%S+) (.*)$")
        if key == "gen" and rest:match("^[0-9a-f]+$") then
            t.gen = rest
        elseif key == "auth" and (rest == "-" or rest:match(TOKEN)) then
            t.auth = rest == "-" and "" or ("Bearer " .. rest)
        elseif key == "route" then
            local m, s, c, bp, sh = rest:match("^(%S+) (%S+) (%S+) (%d+) ([01])$")
            bp = tonumber(bp)
            if not m or not m:match(NAME) or not s:match(NAME) or not c:match(NAME) or bp > 10000 then
                return nil, "bad route line: " .. line
            end
            t.routes[m] = { stable = s, canary = c ~= "-" and c or nil, bp = bp, shadow = sh == "1" }
        elseif key == "batched" then
            local m, v, twin = rest:match("^(%S+) (%S+) (%S+)$")
            if not m or not m:match(NAME) or not v:match(NAME) or not twin:match(NAME) then
                return nil, "bad batched line: " .. line
            end
            t.batched[m .. "/" .. v] = twin
        else
            return nil, "bad line: " .. line
        end
    end
    if not t.gen then
        return nil, "no gen line"
    end
    return t
end

local function current()
    local text = dict:get("routes")
    if text ~= seen_text then
        local parsed = text and parse(text)
        -- the admin location stores only text that parsed: a failure here is an empty dict (not loaded yet)
        table_ = parsed or { gen = "", auth = "", routes = {}, batched = {} }
        seen_text = text
    end
    return table_
end

-- init_by_lua (the master, at start and at each reload): the route table the pipeline last wrote.
function M.load(path)
    local f = io.open(path, "r")
    if not f then
        return  -- no routes yet: every model answers 404 ModelNotRouted until the first route change
    end
    local text = f:read("*a")
    f:close()
    local parsed, err = parse(text)
    if not parsed then
        ngx.log(ngx.ERR, "canaryflow: ", path, " ignored: ", err)
        return
    end
    dict:set("routes", text)
end

-- The version an unpinned request for `model` goes to ("" when the model is not routed); sets $cf_canary,
-- $cf_shadow_on (a shadowed model: stable answers, the canary gets a copy), $cf_auth and $cf_upstream_model on the
-- way. A canary share of bp basis points takes the requests whose sticky key hashes below bp: when the share grows,
-- users only move stable -> canary, never back; the key is "<model>:<user>" (or the request id), so models split
-- independently.
local function routed(t, model, split_key)
    local r = t.routes[model]
    if not r then
        return ""
    end
    if not r.canary then
        return r.stable
    end
    ngx.var.cf_canary = r.canary
    if r.shadow then
        ngx.var.cf_shadow_on = "1"
        return r.stable
    end
    if r.bp >= 10000 then
        return r.canary
    end
    if r.bp > 0 and ngx.crc32_long(model .. ":" .. split_key) % 10000 < r.bp then
        return r.canary
    end
    return r.stable
end

-- Adaptive batching: the TorchServe model a request for `version` (the pinned one, else the routed one) goes to.
-- A version with a batched twin gets a lone request on its own unbatched registration and, while another request
-- for it is in flight, on the twin, whose batches then fill without a lone request waiting for them. The request is
-- counted (its key in the variable `flight`) until its log phase (M.done), which nginx runs however it ends.
local function upstream_model(t, model, version, flight)
    local key = model .. "/" .. version
    local twin = t.batched[key]
    if not twin then
        return model
    end
    local n = in_flight[key] or 0
    in_flight[key] = n + 1
    ngx.var[flight] = key
    if n > 0 then
        return twin
    end
    return model
end

function M.route(model, split_key)
    local t = current()
    ngx.var.cf_auth = t.auth
    local version = routed(t, model, split_key)
    local target = version
    local pin = ngx.var.http_x_model_version
    if pin and pin ~= "" then
        target = pin  -- an invalid or refused pin is answered by the guards; M.done undoes its count
    end
    if target ~= "" then
        ngx.var.cf_upstream_model = upstream_model(t, model, target, "cf_flight")
    end
    return version
end

-- The TorchServe model a shadow copy of a request goes to: the canary's own registration or, while another request
-- for the canary is in flight, its batched twin (in shadow mode the canary gets a copy of every request).
function M.copy_model(model, canary)
    return upstream_model(current(), model, canary, "cf_copy_flight")
end

-- log_by_lua (server level, so a request that ended in an error_page location is counted out too). A shadow copy
-- is a subrequest, which shares its request's variables: it is counted under its own variable.
function M.done()
    local key
    if ngx.is_subrequest then
        key = ngx.var.cf_copy_flight
    else
        key = ngx.var.cf_flight
    end
    if key and key ~= "" then
        local n = (in_flight[key] or 1) - 1
        in_flight[key] = n > 0 and n or nil
    end
end

-- The admin socket (owner-only, in the router's 0700 dir): GET answers the live table, PUT replaces it whole.
function M.admin()
    local method = ngx.req.get_method()
    if method == "GET" then
        ngx.print(dict:get("routes") or "")
        return
    end
    if method ~= "PUT" then
        ngx.status = 405
        ngx.say("use GET or PUT")
        return
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    local parsed, err = parse(body or "")
    if not parsed then
        ngx.status = 400
        ngx.say(err)
        return
    end
    local ok, set_err = dict:set("routes", body)
    if not ok then
        ngx.status = 507
        ngx.say("cannot store the route table: ", set_err)
        return
    end
    ngx.say("gen ", parsed.gen)
end

return M
