-- mod_auth_xcauth: Prosody 0.12 authentication provider talking to the xcauth daemon.
--
-- Configuration (global or per VirtualHost):
--   authentication = "xcauth"
--   xcauth_socket  = "127.0.0.1:23663"  -- "IP:PORT", "[IPv6]:PORT" or an absolute UNIX socket path
--   xcauth_timeout = 5                  -- seconds to wait for an answer
--   xcauth_connections = 4              -- at most this many persistent connections per host
--   xcauth_sync_timeout = 1             -- blocking fallback outside async contexts; 0 = answer false
--
-- Wire protocol: the "prosody" line framing of xcauth (see PROTOCOLS.md):
--   auth:USER:DOMAIN:PASSWORD\n  and  isuser:USER:DOMAIN\n   ->   1\n or 0\n
-- The daemon answers the requests of one connection strictly in order, so requests are
-- pipelined on a connection and matched to a FIFO of waiters.  Because strict ordering
-- means one slow backend answer would hold up every request queued behind it, a request
-- goes to an idle connection when there is one, and a new persistent connection is
-- opened (up to xcauth_connections) when all are busy; only beyond that are requests
-- pipelined behind others (onto the connection with the fewest outstanding requests).
--
-- Waiting uses util.async (c2s SASL runs inside the session's async runner in 0.12), so
-- a slow answer never blocks Prosody.  Only uses what Debian's prosody package ships:
-- Prosody's util.* and net.* libraries and LuaSocket.

local new_sasl = require "util.sasl".new;
local async = require "util.async";
local server = require "net.server";
local inet_pton = require "util.net".pton;
local monotonic = require "util.time".monotonic;
local socket = require "socket";

local host = module.host;

local socket_spec = module:get_option_string("xcauth_socket", "127.0.0.1:23663");
local request_timeout = module:get_option_number("xcauth_timeout", 5);
local max_connections = math.max(1, math.floor(module:get_option_number("xcauth_connections", 4)));
local sync_timeout = module:get_option_number("xcauth_sync_timeout", 1);
local backoff_min = module:get_option_number("xcauth_reconnect_min", 0.1);
local backoff_max = module:get_option_number("xcauth_reconnect_max", 10);
local MAX_REQUEST = 1000; -- bytes per request line, including the newline

local is_prosodyctl = prosody.process_type ~= "prosody";

---------------------------------------------------------------------------
-- Where is the daemon?
---------------------------------------------------------------------------

local unix_path, tcp_ip, tcp_port, tcp_type;
do
	if socket_spec:sub(1, 1) == "/" then
		unix_path = socket_spec;
	else
		local ip, port = socket_spec:match("^%[([^%]]+)%]:(%d+)$");
		if not ip then
			ip, port = socket_spec:match("^([^:]+):(%d+)$");
		end
		if ip == "localhost" then ip = "127.0.0.1"; end
		port = tonumber(port);
		local packed = ip and inet_pton(ip);
		if not packed or not port or port < 1 or port > 65535 then
			error(("xcauth_socket = %q: expected \"IP:PORT\", \"[IPv6]:PORT\" or an absolute UNIX socket path"
				.. " (host names are not resolved)"):format(socket_spec));
		end
		tcp_ip, tcp_port = ip, port;
		tcp_type = #packed == 16 and "tcp6" or "tcp4";
	end
end

local unix_socket;
if unix_path then
	local ok, mod = pcall(require, "socket.unix");
	if not ok then
		error("xcauth_socket is a UNIX socket path, but LuaSocket's socket.unix is not available");
	end
	unix_socket = mod;
end

local target = unix_path or (tcp_type == "tcp6" and ("[%s]:%d"):format(tcp_ip, tcp_port)
	or ("%s:%d"):format(tcp_ip, tcp_port));

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------
-- A request record: { done = <async waiter "done">, state = "pending" | "answered" |
--   "timedout" | "failed", result = bool, err = string|nil, timer = module timer }
-- A timed-out record stays queued on its connection so that its late answer is
-- consumed and discarded instead of being given to the next waiter.

local function finish(rec, state, result, err)
	if rec.state ~= "pending" then return; end
	rec.state, rec.result, rec.err = state, result, err;
	if rec.timer and state ~= "timedout" then
		rec.timer:stop();
		rec.timer = nil;
	end
	rec.done(); -- may resume the waiting thread synchronously
end

local function stop_timer(rec)
	if rec.timer then rec.timer:stop(); rec.timer = nil; end
end

---------------------------------------------------------------------------
-- Connections
---------------------------------------------------------------------------
-- A connection object: { iface = net.server interface, id = n, fifo = {first, last, ...},
--   inbuf = "", connected_at = monotonic time or nil, closed = bool }

local pool = {};                                   -- open (or opening) connection objects
local by_iface = setmetatable({}, { __mode = "k" }); -- net.server interface -> object
local next_id = 0;
local backoff = backoff_min;
local reconnect_timer;
local stopping = false; -- module unloading or server shutting down
local open_connection;  -- forward declaration

local function outstanding(cobj)
	return cobj.fifo.last - cobj.fifo.first + 1;
end

local function fifo_push(cobj, rec)
	local fifo = cobj.fifo;
	fifo.last = fifo.last + 1;
	fifo[fifo.last] = rec;
end

local function fifo_pop(cobj)
	local fifo = cobj.fifo;
	local first = fifo.first;
	if first > fifo.last then return nil; end
	local rec = fifo[first];
	fifo[first] = nil;
	fifo.first = first + 1;
	return rec;
end

local function remove_from_pool(cobj)
	for i = #pool, 1, -1 do
		if pool[i] == cobj then table.remove(pool, i); end
	end
end

-- Keep at least one persistent connection: reconnect with exponential backoff.
local function schedule_reconnect()
	if stopping or reconnect_timer or #pool > 0 then return; end
	local delay = backoff;
	backoff = math.min(backoff * 2, backoff_max);
	module:log("debug", "Reconnecting to xcauth at %s in %gs", target, delay);
	reconnect_timer = module:add_timer(delay, function ()
		reconnect_timer = nil;
		if not stopping and #pool == 0 then
			open_connection();
		end
	end);
end

local listeners = {};

function listeners.onconnect(iface)
	local cobj = by_iface[iface];
	if not cobj or cobj.connected_at then return; end
	cobj.connected_at = monotonic();
	module:log("debug", "Connection %d to xcauth at %s established", cobj.id, target);
end

function listeners.onincoming(iface, data)
	local cobj = by_iface[iface];
	if not cobj or cobj.closed then return; end
	local buf = cobj.inbuf .. data;
	local pos = 1;
	while true do
		local nl = buf:find("\n", pos, true);
		if not nl then break; end
		local line = buf:sub(pos, nl - 1):gsub("\r$", "");
		pos = nl + 1;
		local rec = fifo_pop(cobj);
		if not rec then
			module:log("error", "xcauth at %s sent an answer nobody asked for; dropping connection %d", target, cobj.id);
			cobj.inbuf = "";
			iface:close();
			return;
		end
		backoff = backoff_min; -- the daemon answers: it is healthy
		stop_timer(rec);
		if rec.state == "timedout" then
			module:log("debug", "Discarding a late answer to a timed-out request (connection %d)", cobj.id);
		elseif rec.state == "pending" then
			if line ~= "1" and line ~= "0" then
				module:log("warn", "Unexpected answer from xcauth (%d bytes); treating it as a failure", #line);
			end
			finish(rec, "answered", line == "1", line ~= "1" and "not authorized" or nil);
		end
		if cobj.closed then return; end -- the resumed thread may have torn the connection down
	end
	cobj.inbuf = buf:sub(pos);
	if #cobj.inbuf > 4096 then
		module:log("error", "xcauth at %s sent an over-long line; dropping connection %d", target, cobj.id);
		cobj.inbuf = "";
		iface:close();
	end
end

function listeners.ondisconnect(iface, err)
	local cobj = by_iface[iface];
	if not cobj or cobj.closed then return; end
	cobj.closed = true;
	by_iface[iface] = nil;
	remove_from_pool(cobj);
	local lost = {};
	for i = cobj.fifo.first, cobj.fifo.last do
		lost[#lost + 1] = cobj.fifo[i];
	end
	cobj.fifo = { first = 1, last = 0 };
	local pending = 0;
	for _, rec in ipairs(lost) do
		if rec.state == "pending" then pending = pending + 1; end
	end
	if cobj.connected_at then
		module:log((stopping or pending == 0) and "debug" or "warn",
			"Connection %d to xcauth at %s closed (%s); %d waiting request(s) failed",
			cobj.id, target, err or "closed", pending);
	else
		module:log(pending > 0 and "warn" or "debug", "Connecting to xcauth at %s failed (%s); %d request(s) failed",
			target, err or "closed", pending);
	end
	schedule_reconnect();
	for _, rec in ipairs(lost) do
		stop_timer(rec);
		finish(rec, "failed", false, "connection to xcauth lost");
	end
end

-- An idle persistent connection is fine; never let the read timeout close it.
function listeners.onreadtimeout(iface) -- luacheck: ignore 212
	return true;
end

function open_connection()
	if stopping then return nil; end
	if reconnect_timer then reconnect_timer:stop(); reconnect_timer = nil; end
	local iface, err;
	if unix_path then
		local sock;
		sock, err = unix_socket.stream();
		if sock then
			sock:settimeout(0);
			local ok;
			ok, err = sock:connect(unix_path); -- AF_UNIX connects immediately or fails
			if ok then
				iface, err = server.wrapclient(sock, unix_path, 0, listeners, "*a");
			else
				sock:close();
			end
		end
	else
		iface, err = server.addclient(tcp_ip, tcp_port, listeners, "*a", nil, tcp_type);
	end
	if not iface then
		module:log("debug", "Connecting to xcauth at %s failed: %s", target, err or "unknown error");
		schedule_reconnect();
		return nil;
	end
	next_id = next_id + 1;
	local cobj = { iface = iface, id = next_id, fifo = { first = 1, last = 0 }, inbuf = "" };
	if unix_path then cobj.connected_at = monotonic(); end
	by_iface[iface] = cobj;
	pool[#pool + 1] = cobj;
	module:log("debug", "Opening connection %d to xcauth at %s (%d open)", cobj.id, target, #pool);
	return cobj;
end

-- An idle connection if there is one, else a new one (pool permitting), else the
-- least busy one.
local function choose_connection()
	local best;
	for _, cobj in ipairs(pool) do
		local n = outstanding(cobj);
		if n == 0 then return cobj; end
		if not best or n < outstanding(best) then best = cobj; end
	end
	if #pool < max_connections then
		local cobj = open_connection();
		if cobj then return cobj; end
	end
	return best;
end

---------------------------------------------------------------------------
-- Queries
---------------------------------------------------------------------------

local warned_sync = false;

-- Blocking one-shot query with a short timeout, for callers that cannot wait
-- asynchronously (prosodyctl, or code running outside an async runner).
local function sync_query(line, timeout)
	if timeout <= 0 then
		module:log("warn", "xcauth query outside an async context: answering false (xcauth_sync_timeout = 0)");
		return false, "not in an async context";
	end
	if not warned_sync and not is_prosodyctl then
		warned_sync = true;
		module:log("warn", "xcauth query outside an async context: using a blocking query (at most %gs). %s",
			timeout, debug.traceback("Called from", 3));
	else
		module:log("debug", "xcauth query outside an async context: using a blocking query (at most %gs)", timeout);
	end
	local sock, err;
	if unix_path then
		sock, err = unix_socket.stream();
	else
		sock, err = socket[tcp_type]();
	end
	if not sock then return false, err; end
	sock:settimeout(timeout, "t");
	local ok, answer;
	if unix_path then
		ok, err = sock:connect(unix_path);
	else
		ok, err = sock:connect(tcp_ip, tcp_port);
	end
	if ok then
		ok, err = sock:send(line);
		if ok then
			answer, err = sock:receive("*l");
		end
	end
	sock:close();
	if not answer then
		module:log("warn", "Blocking xcauth query to %s failed: %s", target, tostring(err));
		return false, err;
	end
	answer = answer:gsub("\r$", "");
	return answer == "1", answer ~= "1" and "not authorized" or nil;
end

-- Send one request line; returns true/false (and an error string).
local function query(line, what)
	if #line > MAX_REQUEST then
		module:log("warn", "Refusing %s request: %d bytes exceeds the %d byte limit", what, #line, MAX_REQUEST);
		return false, "request too long";
	end
	if is_prosodyctl then
		return sync_query(line, request_timeout);
	end
	if not async.ready() then
		return sync_query(line, sync_timeout);
	end

	local cobj = choose_connection();
	if not cobj then
		module:log("warn", "xcauth at %s is unavailable; answering false to a %s request", target, what);
		return false, "xcauth unavailable";
	end

	local wait, done = async.waiter();
	local rec = { done = done, state = "pending" };
	local started = monotonic();
	fifo_push(cobj, rec);
	rec.timer = module:add_timer(request_timeout, function ()
		if rec.state == "pending" then
			module:log("warn", "xcauth did not answer a %s request within %gs; answering false", what, request_timeout);
			finish(rec, "timedout", false, "timeout");
			return request_timeout; -- check once more: is the daemon stuck?
		elseif rec.state == "timedout" then
			rec.timer = nil;
			if not cobj.closed then
				module:log("error", "xcauth at %s has not answered for %gs; dropping connection %d",
					target, 2 * request_timeout, cobj.id);
				cobj.iface:close();
			end
		end
	end);
	cobj.iface:write(line); -- a synchronous failure runs ondisconnect, which finishes rec before wait()
	wait();
	module:log("debug", "xcauth %s request on connection %d: %s after %.3fs", what, cobj.id,
		rec.state == "answered" and (rec.result and "yes" or "no") or rec.state, monotonic() - started);
	return rec.result == true, rec.err;
end

local function valid_user(s)
	return type(s) == "string" and s ~= "" and not s:find("[\r\n%z:]");
end

local function valid_password(s)
	return type(s) == "string" and not s:find("[\r\n%z]");
end

---------------------------------------------------------------------------
-- The auth provider
---------------------------------------------------------------------------

local provider = {};

function provider.test_password(username, password)
	if not valid_user(username) or not valid_password(password) then
		module:log("debug", "Refusing credentials containing forbidden characters");
		return nil, "not authorized";
	end
	module:log("debug", "Checking password of %s@%s", username, host);
	local ok, err = query("auth:" .. username .. ":" .. host .. ":" .. password .. "\n", "auth");
	if ok then return true; end
	return nil, err or "not authorized";
end

function provider.user_exists(username)
	if not valid_user(username) then
		return nil, "user not found";
	end
	local ok, err = query("isuser:" .. username .. ":" .. host .. "\n", "isuser");
	if ok then return true; end
	return nil, err or "user not found";
end

function provider.get_password()
	return nil, "not supported";
end

function provider.set_password()
	return nil, "not supported";
end

function provider.create_user()
	return nil, "not supported";
end

function provider.delete_user()
	return nil, "not supported";
end

-- Users live in Nextcloud and cannot be listed from here: an empty list, so
-- that callers iterating over it (the admin shell's user:list) get no error.
function provider.users()
	return function() return nil; end;
end

function provider.get_sasl_handler()
	return new_sasl(host, {
		plain_test = function (sasl, username, password, realm) -- luacheck: ignore 212
			-- Second value true = "account not disabled"; a false first value then
			-- makes util.sasl answer not-authorized.
			return provider.test_password(username, password) == true, true;
		end;
	});
end

module:provides("auth", provider);

---------------------------------------------------------------------------
-- Lifecycle
---------------------------------------------------------------------------

if not is_prosodyctl then
	-- Connect early so that the first login does not pay for the connection setup.
	module:add_timer(0, function ()
		if #pool == 0 then open_connection(); end
	end);
end

module:hook_global("server-stopping", function ()
	stopping = true;
	if reconnect_timer then reconnect_timer:stop(); reconnect_timer = nil; end
end);

function module.unload()
	stopping = true;
	if reconnect_timer then reconnect_timer:stop(); reconnect_timer = nil; end
	local open = {};
	for i, cobj in ipairs(pool) do open[i] = cobj; end
	for _, cobj in ipairs(open) do
		cobj.iface:close(); -- ondisconnect fails whatever is still waiting
	end
end
