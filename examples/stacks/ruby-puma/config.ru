# frozen_string_literal: true

# The example app as a Rack app, run by puma (see run.sh: cluster mode, several threads per
# worker). Nothing is shared between requests but what the sidecar keeps in the session, so
# any worker and any thread may serve any request.
require "rack"
require_relative "../../../helpers/ruby/sidecar_session"

# The sidecar's [security] upstream_signing_key. Unset or empty: no key, nothing checked (the
# helper refuses an empty key), and a line on stderr at boot (with preload_app!, puma's own
# stderr: the app is loaded before stdout_redirect takes effect).
SIGNING_KEY = ENV["SIDECAR_SIGNING_KEY"].then { |k| k.nil? || k.empty? ? nil : k }
warn "config.ru: SIDECAR_SIGNING_KEY is not set: session headers are not checked" if SIGNING_KEY.nil?

# Frozen on purpose, as constants often are. Rack 3 wants an unfrozen headers Hash in every
# response, and Rack 3's middlewares (ContentLength, Head) change it in place: the helper's
# finish() builds a new Hash, and the other answers below pass a copy (.dup).
TEXT = { "content-type" => "text/plain; charset=utf-8" }.freeze
HTML = { "content-type" => "text/html; charset=utf-8" }.freeze

PAGES = %w[/ /cart/add /cart /login /whoami /logout /password /logout-everywhere /test-cookie
           /form /expiry /status /big /big/size /sequence /sequence/check].freeze

class ExampleApp
  def call(env)
    s = SidecarSession.new(env, key: SIGNING_KEY, window: 60)
    unless s.trusted?
      return [403, TEXT.dup, ["forged session headers refused\n"]]
    end

    req = Rack::Request.new(env)
    read = req.get? || req.head?
    path = req.path_info.empty? ? "/" : req.path_info
    q = req.GET

    case [path, read ? :read : req.request_method]
    when ["/", :read]
      n = s.get("visits", 0) + 1
      s.incr("visits")
      text(s, "You have visited this page #{n} #{n == 1 ? 'time.' : 'times.'}")
    when ["/cart/add", :read]
      item = q["item"].to_s
      s.append("cart", item)
      text(s, "added #{item}")
    when ["/cart", :read]
      cart = s.get("cart", [])
      text(s, "cart: #{cart.is_a?(Array) ? cart.join(',') : ''}")
    when ["/login", :read]
      user = q["user"].to_s
      s.cycle
      s.set_subject(user)
      s.set("user", user)
      text(s, "logged in as #{user}")
    when ["/whoami", :read]
      lines = ["user: #{s.get('user') || 'anonymous'}", "subject: #{s.subject || 'none'}"]
      flash = s.get("flash")
      unless flash.nil?
        lines << "flash: #{flash}"
        s.delete("flash")
      end
      text(s, *lines)
    when ["/logout", :read]
      s.flush
      s.set("flash", "You have been logged out.")
      text(s, "logged out")
    when ["/password", "POST"]
      s.revoke_others
      s.cycle
      text(s, "password changed")
    when ["/logout-everywhere", :read]
      s.revoke_all
      s.set("flash", "You were logged out everywhere.")
      text(s, "logged out everywhere")
    when ["/test-cookie", :read]
      if s.status == "existing" && s.data.key?("testcookie")
        s.delete("testcookie")
        text(s, "cookies work")
      else
        s.set("testcookie", "worked")
        text(s, "test cookie set")
      end
    when ["/form", :read]
      s.finish(200, HTML, [<<~HTML])
        <!DOCTYPE html>
        <html><head><title>Comment</title></head><body>
        <form method="post" action="/form">
        #{s.csrf_field}
        <input type="text" name="comment">
        <button type="submit">Send</button>
        </form>
        </body></html>
      HTML
    when ["/form", "POST"]
      comment = req.POST["comment"].to_s
      s.set("comment", comment)
      text(s, "form accepted: #{comment}")
    when ["/expiry", :read]
      seconds = q["seconds"].to_s
      s.set_expiry(seconds) # raises (500) on anything but N, 0, default, a timestamp
      s.set("expiry", seconds)
      text(s, "expiry: #{seconds}")
    when ["/status", :read]
      text(s, "status: #{s.status}", "expiry-age: #{s.expiry_age || 'none'}",
           "keys: #{s.data.keys.sort.join(',')}")
    when ["/big", :read]
      bytes = q["bytes"].to_s.match?(/\A[0-9]{1,7}\z/) ? q["bytes"].to_i : 0
      s.set("big", "x" * bytes)
      text(s, "stored #{bytes}")
    when ["/big/size", :read]
      big = s.get("big", "")
      text(s, "big: #{big.to_s.length}")
    when ["/sequence", :read]
      # Calls on the same keys in one request: the session ends as these calls say, whatever
      # order the headers reach the sidecar in (the helper never puts one key in two headers).
      s.set("n", 10)
      s.incr("n", 5)
      s.delete("seq")
      s.append("seq", "a")
      s.append("seq", "b")
      s.set("gone", 1)
      s.delete("gone")
      text(s, "sequence done")
    when ["/sequence/check", :read]
      seq = s.get("seq", [])
      gone = s.get("gone")
      text(s, "n: #{s.get('n') || 'none'}", "seq: #{seq.is_a?(Array) ? seq.join(',') : ''}",
           "gone: #{gone.nil? ? 'none' : gone}")
    else
      if PAGES.include?(path)
        allow = { "/password" => "POST", "/form" => "GET, HEAD, POST" }.fetch(path, "GET, HEAD")
        [405, TEXT.merge("allow" => allow), ["method not allowed\n"]]
      else
        [404, TEXT.dup, ["not found\n"]]
      end
    end
  end

  private

  def text(s, *lines)
    s.finish(200, TEXT, [lines.map { |l| "#{l}\n" }.join])
  end
end

# Rack::Head: the Rack spec wants an empty body for HEAD (puma would drop it anyway);
# Rack::ContentLength inside it, so that HEAD keeps the length the GET would have.
use Rack::Head
use Rack::ContentLength
run ExampleApp.new
