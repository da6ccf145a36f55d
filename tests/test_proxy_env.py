"""Which proxy an agent uses: the rules of Go's http.ProxyFromEnvironment
(golang.org/x/net/http/httpproxy), as remotedialer_py._proxy applies them.

Pure Python, no engine: every case passes its own environment mapping. The
cases restate the ones Go's own tests check (proxy_test.go), in a table:
an environment, a server URL, and the proxy that must be chosen (None:
direct) or the error. test_proxy_connect.py takes the environment's proxy
end to end, to a server on a non-loopback address of the machine (Go never
proxies loopback).
"""

import pytest

from remotedialer_py import _proxy

# (environment, server URL, expected proxy or None, or an exception text)
CASES = [
    # A bare host[:port] is taken as http://.
    ({"HTTP_PROXY": "127.0.0.1:8080"}, "ws://example.com/c", "http://127.0.0.1:8080"),
    ({"HTTP_PROXY": "cache.corp.example.com:1234"}, "ws://example.com/c",
     "http://cache.corp.example.com:1234"),
    ({"HTTP_PROXY": "cache.corp.example.com"}, "ws://example.com/c",
     "http://cache.corp.example.com"),
    # A single-label name is a host, not a scheme.
    ({"HTTP_PROXY": "localhost"}, "ws://example.com/c", "http://localhost"),
    ({"HTTP_PROXY": "http://127.0.0.1:8080"}, "ws://example.com/c", "http://127.0.0.1:8080"),
    ({"HTTP_PROXY": "HTTP://127.0.0.1:8080/"}, "ws://example.com/c", "http://127.0.0.1:8080/"),
    # Go would also take https:// and socks5:// proxies; this agent speaks
    # CONNECT over plain HTTP only, and says so instead of going direct.
    ({"HTTP_PROXY": "https://127.0.0.1:8080"}, "ws://example.com/c",
     "HTTP_PROXY: https:// proxies are not supported"),
    ({"HTTP_PROXY": "socks5://127.0.0.1"}, "ws://example.com/c",
     "HTTP_PROXY: socks5:// proxies are not supported"),
    ({"http_proxy": "foo://host"}, "ws://example.com/c",
     "http_proxy: invalid proxy URL 'foo://host': the scheme must be http://"),
    # ws:// takes HTTP_PROXY, wss:// HTTPS_PROXY, never the other one.
    ({"HTTP_PROXY": "http.proxy.tld", "HTTPS_PROXY": "secure.proxy.tld"},
     "ws://insecure.tld/", "http://http.proxy.tld"),
    ({"HTTP_PROXY": "http.proxy.tld", "HTTPS_PROXY": "secure.proxy.tld"},
     "wss://secure.tld/", "http://secure.proxy.tld"),
    ({"HTTP_PROXY": "http.proxy.tld"}, "wss://secure.tld/", None),
    ({"HTTPS_PROXY": "secure.proxy.tld"}, "ws://insecure.tld/", None),
    # Upper case wins; an empty upper-case value lets the lower case through.
    ({"HTTPS_PROXY": "upper:1", "https_proxy": "lower:2"}, "wss://a.example/", "http://upper:1"),
    ({"HTTPS_PROXY": "", "https_proxy": "lower:2"}, "wss://a.example/", "http://lower:2"),
    ({"https_proxy": "lower:2"}, "wss://a.example/", "http://lower:2"),
    ({"NO_PROXY": "", "no_proxy": "a.example", "HTTPS_PROXY": "p:1"}, "wss://a.example/", None),
    ({"NO_PROXY": "b.example", "no_proxy": "a.example", "HTTPS_PROXY": "p:1"},
     "wss://a.example/", "http://p:1"),
    # Under CGI (REQUEST_METHOD set) HTTP_PROXY may come from a request's
    # Proxy: header: using it is an error; HTTPS_PROXY still applies.
    ({"HTTP_PROXY": "http://10.1.2.3:8080", "REQUEST_METHOD": "GET"}, "ws://example.com/",
     "refusing to use HTTP_PROXY value in CGI environment"),
    ({"HTTP_PROXY": "http://10.1.2.3:8080", "REQUEST_METHOD": "GET"}, "ws://localhost/",
     "refusing to use HTTP_PROXY value in CGI environment"),
    ({"HTTPS_PROXY": "secure.proxy.tld", "REQUEST_METHOD": "GET"}, "wss://secure.tld/",
     "http://secure.proxy.tld"),
    ({"REQUEST_METHOD": "GET"}, "ws://example.com/", None),
    # No proxy variable, no proxy.
    ({}, "ws://example.com/", None),
    # NO_PROXY: a domain matches itself and its subdomains, ".domain" only
    # the subdomains, and never a longer name that merely ends the same.
    ({"NO_PROXY": "example.com", "HTTP_PROXY": "proxy"}, "ws://example.com/", None),
    ({"NO_PROXY": ".example.com", "HTTP_PROXY": "proxy"}, "ws://example.com/", "http://proxy"),
    ({"NO_PROXY": "ample.com", "HTTP_PROXY": "proxy"}, "ws://example.com/", "http://proxy"),
    ({"NO_PROXY": "example.com", "HTTP_PROXY": "proxy"}, "ws://foo.example.com/", None),
    ({"NO_PROXY": ".foo.com", "HTTP_PROXY": "proxy"}, "ws://example.com/", "http://proxy"),
    # Non-ASCII entries compare in their punycode form.
    ({"NO_PROXY": ".示例.com", "HTTP_PROXY": "proxy"}, "ws://www.xn--fsq092h.com/", None),
    ({"NO_PROXY": "示例.com", "HTTP_PROXY": "proxy"}, "ws://www.xn--fsq092h.com/", None),
    ({"NO_PROXY": "xn--fsq092h.com", "HTTP_PROXY": "proxy"}, "ws://www.xn--fsq092h.com/", None),
    # A port in an entry must match the URL's (default 80 / 443).
    ({"NO_PROXY": "example.com:80", "HTTP_PROXY": "proxy"}, "ws://example.com/", None),
    ({"NO_PROXY": "example.com:443", "HTTP_PROXY": "proxy"}, "ws://example.com/", "http://proxy"),
    ({"NO_PROXY": "example.com:443", "HTTPS_PROXY": "proxy"}, "wss://example.com/", None),
    ({"NO_PROXY": "example.com:8123", "HTTP_PROXY": "proxy"}, "ws://example.com:8123/", None),
    ({"NO_PROXY": "*", "HTTPS_PROXY": "proxy"}, "wss://anything.example/", None),
    ({"NO_PROXY": " a.example , * ", "HTTPS_PROXY": "proxy"}, "wss://b.example/", None),
    # A malformed entry (no host) is skipped, not fatal.
    ({"NO_PROXY": ":1", "HTTP_PROXY": "proxy"}, "ws://example.com/", "http://proxy"),
    # Bad proxy values are errors that name the variable, with the password
    # hidden.
    ({"HTTPS_PROXY": "http://u:secret@host:99999"}, "wss://a.example/",
     "HTTPS_PROXY: invalid proxy URL 'http://u:xxxxx@host:99999': port range"),
    ({"HTTPS_PROXY": "http://host:3128/path"}, "wss://a.example/",
     "nothing may follow HOST[:PORT] but '/'"),
    ({"HTTPS_PROXY": "http://us er@host"}, "wss://a.example/", "invalid proxy URL"),
    ({"HTTPS_PROXY": "http://u:p%zz@host"}, "wss://a.example/", "bad %-escape"),
    ({"HTTPS_PROXY": "http://u:p/x@host"}, "wss://a.example/", "nothing may follow"),
    ({"HTTPS_PROXY": "http://u:p#x@host"}, "wss://a.example/", "nothing may follow"),
]

# Go's useProxy table: this NO_PROXY, then each host on port 80.
NO_PROXY = ("foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, "
            "192.168.1.3:80, 10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:2]:443, "
            "[2001:db8::52:0:3]:80, 2002:db8:a::45/64")
USE_PROXY = [
    # localhost and loopback addresses never go through a proxy.
    ("localhost", False), ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
    ("::ffff:127.0.0.1", False),
    ("::2", True),
    ("192.168.1.1", False),       # the address itself
    ("192.168.1.2", True),        # listed with another port
    ("192.168.1.3", False),       # listed with this port
    ("192.168.1.4", True),        # not listed
    ("10.0.0.2", False),          # inside 10.0.0.0/30
    ("10.0.0.4", True),           # just outside it
    ("2001:db8::52:0:1", False),  # an IPv6 address, unbracketed in the list
    ("2001:db8::52:0:2", True),   # listed with port 443
    ("2001:db8::52:0:3", False),  # listed bracketed with port 80
    ("2002:db8:a::123", False),   # inside 2002:db8:a::/64
    ("fe80::424b:c8be:1643:a1b6", True),
    ("barbaz.net", True),         # .barbaz.net: subdomains only
    ("www.barbaz.net", False),
    ("foobar.com", False),        # foobar.com: itself...
    ("www.foobar.com", False),    # ...and its subdomains
    ("foofoobar.com", True),      # but not a name that only ends the same
    ("baz.com", True),
    ("localhost.net", True),
    ("local.localhost", True),
    ("barbarbaz.net", True),
    ("wildcard.io", True),        # *.wildcard.io: subdomains only
    ("nested.wildcard.io", False),
    ("awildcard.io", True),
    # An IPv6 zone is no way around the list: the address is an address,
    # never a name that ends in a listed domain.
    ("1000::%.foobar.com", True),
]


@pytest.mark.parametrize("environ, url, expected", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_proxy_from_environment(environ, url, expected):
    if expected is not None and not expected.startswith("http://"):
        with pytest.raises(ValueError) as info:
            _proxy.proxy_from_environment(url, environ)
        assert expected in str(info.value)
        assert "secret" not in str(info.value)
    else:
        assert _proxy.proxy_from_environment(url, environ) == expected


@pytest.mark.parametrize("host, proxied", USE_PROXY)
def test_no_proxy_matching(host, proxied):
    assert _proxy.use_proxy(host, "80", NO_PROXY) is proxied


@pytest.mark.parametrize("host", [h for h, _ in USE_PROXY])
def test_no_proxy_star_excludes_everything(host):
    assert _proxy.use_proxy(host, "80", "*") is False


@pytest.mark.parametrize("value, expected", [
    ("http://user:pass@proxy:3128", "http://user:pass@proxy:3128"),
    ("user:pass@proxy:3128", "http://user:pass@proxy:3128"),
    ("http://us%40er:p%3Ass@[::1]:3128/", "http://us%40er:p%3Ass@[::1]:3128/"),
    ("http://proxy", "http://proxy"),
])
def test_parse_proxy_url_valid(value, expected):
    assert _proxy.parse_proxy_url(value) == expected


@pytest.mark.parametrize("value, message", [
    ("", "expected http://"),
    ("http://", "empty"),
    ("http://:3128", "missing host"),
    ("http://proxy:port", "bad port"),
    ("http://[::1", "missing bracket"),
    ("http://a b:1", "expected http://"),
    ("socks5h://proxy:1080", "socks5h:// proxies are not supported"),
    ("http://" + "u" * 513 + "@proxy", "credentials longer than 512 bytes"),
    (3128, "proxy must be a str"),
])
def test_parse_proxy_url_invalid(value, message):
    with pytest.raises(ValueError) as info:
        _proxy.parse_proxy_url(value)
    assert message in str(info.value)
    assert str(info.value).startswith("proxy")


def test_redact_hides_only_the_password():
    assert _proxy.redact("http://u:pw@h:1/") == "http://u:xxxxx@h:1/"
    assert _proxy.redact("u:pw@h:1") == "u:xxxxx@h:1"
    assert _proxy.redact("http://u@h:1") == "http://u@h:1"
    assert _proxy.redact("http://h:1") == "http://h:1"


def test_resolve_argument_over_environment():
    env = {"HTTP_PROXY": "envproxy:1", "HTTPS_PROXY": "envproxy:2"}
    urls = ["ws://a.example/c", "wss://b.example/c", "ws://127.0.0.1:8123/c"]
    # None: the environment, URL by URL (a loopback server goes direct).
    assert _proxy.resolve(urls, None, env) == ["http://envproxy:1", "http://envproxy:2", ""]
    # A URL: every server through it, loopback too (Go's http.ProxyURL).
    assert _proxy.resolve(urls, "p:3", env) == ["http://p:3"] * 3
    # "" or False: never a proxy.
    assert _proxy.resolve(urls, "", env) == ["", "", ""]
    assert _proxy.resolve(urls, False, env) == ["", "", ""]
    with pytest.raises(ValueError, match="not True"):
        _proxy.resolve(urls, True, env)
