# frozen_string_literal: true

# Sessions from session-sidecar for Rack apps (Puma, Unicorn, WEBrick, any Rack 2 or 3 server).
# Copy this one file into your app; it needs only Ruby's standard library (json, openssl, time).
#
#   require_relative "sidecar_session"
#
#   KEY = ENV["SIDECAR_SIGNING_KEY"].then { |k| k unless k.to_s.empty? } # "" would raise
#   app = lambda do |env|
#     s = SidecarSession.new(env, key: KEY)
#     return [403, { "content-type" => "text/plain" }, ["forged\n"]] unless s.trusted?
#     n = s.get("visits", 0) + 1
#     s.incr("visits")
#     s.finish(200, { "content-type" => "text/plain" }, ["visit #{n}\n"])
#   end
#
# The header contract is docs/HEADERS.md, the signature docs/SIGNING.md.
#
# Rack traps this file takes care of:
# - Header names: Rack 3 requires lower-case response header names (Rack::Lint refuses
#   "X-Session-Set"); Rack 2 accepts any case. The names here are lower case, good for both.
# - Header hashes may be frozen (a constant, or a middleware's): finish() and
#   response_headers never change the hash they are given, they build a new one.
# - A header given twice must not overwrite the first: each header appears once here, with
#   every pending change of its kind in it.
# - Header order: Puma sends the headers in the Hash's order, but a middleware, a server or a
#   proxy between the app and the sidecar may not (Python's waitress sorts them by name, so
#   x-session-incr would arrive before x-session-set), and the sidecar applies the data headers
#   name by name in the order each name first arrives. So this file never puts one key in two
#   data headers: it keeps at most one pending operation per key, composed here (see incr and
#   append), and what it sends means the same in any header order.
# - Rack 2 treats "\n" in a header value as several headers of that name (Puma writes one
#   line per part): JSON escapes line breaks, set_subject and set_expiry refuse them.
# - Request headers arrive as HTTP_* keys of env, where X-Session and X_Session are the same
#   key (the sidecar removes every client spelling; see HEADERS.md section 0).
# - JSON: generated compact and ASCII-only (a header value must be visible ASCII); Ruby's
#   Integer has no size limit, so big integers round-trip; incr() accepts Integers only
#   (1.0 is not one).

require "json"
require "openssl"
require "time"

class SidecarSession
  PREFIX = "x-session"

  attr_reader :data, :status, :expiry_age, :subject, :csrf_token, :id

  # env: the Rack env. key: the signing key shared with the sidecar (nil = no check; "" raises
  # ArgumentError: anyone can sign with an empty key).
  # window: how far, in seconds, the signature's time may be from this machine's clock.
  def initialize(env, key: nil, window: 60)
    @env = env
    @trusted = true
    @signed = nil
    @data = {}
    @status = "new"
    @expiry_age = nil
    @subject = nil
    @csrf_token = nil
    @id = nil
    @pending = {} # key => [op, value]: at most one of :set, :delete, :incr (the sum), :append (items)
    @flush = false
    @cycle = false
    @new_subject = nil
    @expiry = nil
    @revoke = nil

    unless key.nil?
      # An empty key is a configuration mistake, and anyone can sign with it.
      raise ArgumentError, "SidecarSession: the signing key is empty (pass nil to check nothing)" if key.empty?

      @signed = self.class.signed_names(env, key, window)
      unless @signed
        @trusted = false # untrusted: empty session, status new, no subject
        return
      end
    end
    raw = header(PREFIX)
    if raw
      begin
        parsed = JSON.parse(raw)
        @data = parsed if parsed.is_a?(Hash)
      rescue JSON::ParserError
        @data = {}
      end
    end
    @status = "existing" if header("#{PREFIX}-status") == "existing"
    age = header("#{PREFIX}-expiry-age")
    @expiry_age = Integer(age, 10) if age&.match?(/\A[0-9]+\z/)
    @subject = header("#{PREFIX}-subject")
    @csrf_token = header("#{PREFIX}-csrf")
    @id = header("#{PREFIX}-id")
  end

  # docs/SIGNING.md's check on a Rack env: the names the signature covers, or nil.
  def self.signed_names(env, key, window = 60)
    parts = env.fetch("HTTP_X_SESSION_SIGNATURE", "").to_s.split(";", -1).map(&:strip)
    return nil unless parts.shift == "v1"
    fields = {}
    parts.each do |p|
      k, v = p.split("=", 2)
      fields[k] = v if v && !k.empty?
    end
    t, h, s = fields.values_at("t", "h", "s")
    return nil unless t&.match?(/\A[0-9]+\z/) && h && s
    return nil if (Time.now.to_i - t.to_i).abs > window
    msg = String.new("v1\n#{t}\n", encoding: Encoding::BINARY)
    names = h.split(" ", -1)
    names.each do |name|
      value = env["HTTP_" + name.upcase.tr("-", "_")]
      return nil if value.nil?
      msg << name.b << ":" << value.to_s.b << "\n"
    end
    mac = OpenSSL::HMAC.hexdigest("SHA256", key, msg)
    return nil unless mac.bytesize == s.bytesize
    diff = 0
    mac.bytes.zip(s.bytes) { |a, b| diff |= a ^ b } # constant time
    diff.zero? ? names.map(&:downcase) : nil
  end

  # --- reading --------------------------------------------------------------------------

  def trusted?
    @trusted
  end

  # true when the sidecar said "new" (no usable session cookie came with the request).
  def new?
    @status != "existing"
  end

  def get(key, default = nil)
    key = key.to_s
    @data.key?(key) ? @data[key] : default
  end

  def [](key)
    @data[key.to_s]
  end

  def csrf_field
    return "" if @csrf_token.nil? || @csrf_token.empty?
    token = @csrf_token.gsub(/[&<>"']/, "&" => "&amp;", "<" => "&lt;", ">" => "&gt;",
                                        '"' => "&quot;", "'" => "&#39;")
    %(<input type="hidden" name="csrfmiddlewaretoken" value="#{token}">)
  end

  # --- changing -------------------------------------------------------------------------

  # set and delete replace whatever was pending for the key (see "Header order" above).
  def set(key, value)
    key = key.to_s
    @pending[key] = [:set, value]
    @data[key] = value
    self
  end
  alias []= set

  def delete(key)
    key = key.to_s
    @pending[key] = [:delete, nil]
    @data.delete(key)
    self
  end

  # Adds the Integer n to the Integer at key (a missing key counts as 0). Sent as x-session-incr
  # (atomic in the store: concurrent requests all count), or, after a set or a delete of key in
  # this request, as an x-session-set of the result, which is known then. Returns the new value.
  def incr(key, n = 1)
    key = key.to_s
    raise ArgumentError, "incr(#{key}): not an Integer: #{n.inspect}" unless n.is_a?(Integer)
    op, pending = @pending[key]
    raise ArgumentError, "incr(#{key}): append(#{key}) is pending, the value is a list" if op == :append
    current = @data.fetch(key, 0)
    raise ArgumentError, "incr(#{key}): the stored value is not an Integer" unless current.is_a?(Integer)
    @pending[key] =
      case op
      when :set, :delete then [:set, current + n]
      when :incr then [:incr, pending + n]
      else [:incr, n]
      end
    @data[key] = current + n
  end

  # Appends item to the list at key (a missing key starts an empty list). Sent as
  # x-session-append (atomic in the store: two tabs adding to one cart both keep their item),
  # or, after a set or a delete of key in this request, as an x-session-set of the whole list.
  def append(key, item)
    key = key.to_s
    op, pending = @pending[key]
    raise ArgumentError, "append(#{key}): incr(#{key}) is pending, the value is an Integer" if op == :incr
    current = @data.fetch(key, [])
    raise ArgumentError, "append(#{key}): the stored value is not a list" unless current.is_a?(Array)
    @pending[key] =
      case op
      when :set, :delete then [:set, current + [item]]
      when :append then [:append, pending + [item]]
      else [:append, [item]]
      end
    @data[key] = current + [item]
    self
  end

  # Logout: the old session ends; what is set afterwards goes into a fresh one.
  def flush
    if @revoke
      # After revoke_others: the others, then this one, is all of them (X-Session-Revoke: all
      # ends this session too). A Flush beside Revoke: others would end the others of the fresh
      # session's subject, which has none.
      revoke_all
    else
      drop_data
      @flush = true
    end
    self
  end

  # Login: the same data under a new key.
  def cycle
    @cycle = true
    self
  end

  # Tag the session with a subject (1-200 visible ASCII characters); "" removes the tag.
  def set_subject(subject)
    subject = subject.to_s
    unless subject.match?(/\A[\x21-\x7e]{0,200}\z/)
      raise ArgumentError, 'set_subject: 1-200 visible ASCII characters, or "" to remove'
    end
    # The sidecar revokes with the subject the session has at the end of the answer: a tag
    # after a revoke would change whose sessions end. Tag first, or in the next request.
    raise "set_subject after revoke_others/revoke_all: tag the session first" if @revoke
    @new_subject = subject
    @subject = subject.empty? ? nil : subject
    self
  end

  # Seconds of inactivity (> 0), 0 (until the browser closes), "default", a Time, or an
  # RFC 3339 timestamp string.
  def set_expiry(value)
    @expiry =
      case value
      when Integer
        raise ArgumentError, "set_expiry: negative" if value.negative?
        value.to_s
      when Time then value.utc.iso8601
      when "default" then "default"
      when /\A[0-9]+\z/ then value
      when /\A\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)\z/ then value
      else raise ArgumentError, 'set_expiry: seconds, 0, "default", a Time or an RFC 3339 timestamp'
      end
    self
  end

  # After a password change: end the subject's other sessions. Applied once the rest of the
  # response is stored, with the subject the session has then.
  def revoke_others
    @revoke ||= "others"
    self
  end

  # Logout everywhere: end all the subject's sessions, this one too; what is set afterwards
  # goes into a fresh, untagged session.
  def revoke_all
    # A subject set earlier in this request names whose sessions end (the sidecar reads it so
    # beside Revoke: all, and leaves the fresh session untagged).
    named = @new_subject
    drop_data
    @new_subject = named
    @revoke = "all"
    self
  end

  # --- emitting -------------------------------------------------------------------------

  # The headers to add, as a new Hash with lower-case names (Rack 2 and Rack 3 alike). No key
  # is in two data headers, so the order of set, delete, incr and append does not matter.
  def response_headers
    h = {}
    by_op = Hash.new { |hash, op| hash[op] = {} }
    @pending.each { |key, (op, value)| by_op[op][key] = value }
    h["#{PREFIX}-set"] = json(by_op[:set]) unless by_op[:set].empty?
    h["#{PREFIX}-delete"] = json(by_op[:delete].keys) unless by_op[:delete].empty?
    h["#{PREFIX}-incr"] = json(by_op[:incr]) unless by_op[:incr].empty?
    h["#{PREFIX}-append"] = json(by_op[:append]) unless by_op[:append].empty?
    h["#{PREFIX}-flush"] = "1" if @flush
    h["#{PREFIX}-cycle"] = "1" if @cycle
    h["#{PREFIX}-subject"] = @new_subject unless @new_subject.nil?
    h["#{PREFIX}-expiry"] = @expiry unless @expiry.nil?
    h["#{PREFIX}-revoke"] = @revoke unless @revoke.nil?
    h
  end

  # The Rack response with the session headers added: a new headers Hash (the one given may
  # be frozen), any session header already in it replaced.
  def finish(status, headers, body)
    merged = {}
    headers.each do |k, v|
      name = k.to_s.downcase.tr("_", "-")
      merged[k] = v unless name == PREFIX || name.start_with?("#{PREFIX}-")
    end
    [status, merged.merge(response_headers), body]
  end

  private

  def header(name)
    return nil if @signed && !@signed.include?(name)
    @env["HTTP_" + name.upcase.tr("-", "_")]
  end

  def drop_data
    @pending = {} # data before a flush belongs to the old session
    @data = {}
    @new_subject = nil # the tag goes with the old session
    @expiry = nil
    @subject = nil
  end

  # Compact, ASCII-only JSON: every non-ASCII character as \uXXXX, and DEL too (ASCII, but
  # not allowed in a header value).
  def json(value)
    JSON.generate(value, ascii_only: true).gsub("\x7f", "\\u007f")
  end
end
