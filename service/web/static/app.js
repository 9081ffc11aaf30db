// cfb web page: sign-up, and recommendations that update in place when an item is rated.
// Every text from the data is set with textContent (data is never parsed as HTML), so titles stay text.
"use strict";

(function () {
  var tokenRequired = document.body.dataset.tokenRequired === "true";
  var tokenInput = document.getElementById("api-token");
  if (tokenRequired && tokenInput) {
    document.getElementById("token-box").hidden = false;
    tokenInput.value = sessionStorage.getItem("cfbToken") || "";
    tokenInput.addEventListener("change", function () { sessionStorage.setItem("cfbToken", tokenInput.value); });
  }

  function headers() {
    var h = { "Content-Type": "application/json", "Accept": "application/json" };
    var t = tokenInput ? tokenInput.value : "";
    if (t) { h["Authorization"] = "Bearer " + t; }
    return h;
  }

  function api(method, url, body) {
    return fetch(url, { method: method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) })
      .catch(function () {  // (no answer at all: the browser's own words, "Failed to fetch", say nothing)
        throw new Error("The server cannot be reached: check that it is running, then try again.");
      })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          if (!r.ok) {
            var err = new Error(data.error || ("HTTP " + r.status));
            err.status = r.status;
            err.field = data.field;
            throw err;
          }
          return data;
        });
      });
  }

  // an API error as a page says it: no request-body field names (an answer's error is led by its
  // question's name), and what to do about a missing or wrong token or a body too large
  function pageMessage(e) {
    if (e.status === 401) {
      if (tokenInput && tokenInput.value) {
        return "The API token entered is not this server's: check it in the API token box above.";
      }
      return tokenInput ? "This server needs its API token to write: enter it in the API token box above."
                        : "This server needs an API token to write.";
    }
    if (e.status === 413) { return "Too much to send at once: shorten the longest answers and try again."; }
    var text = e.message.replace(/^request body, /, "").replace(/^field '[^']*': /, "");
    var answer = /^answers\.(.+)$/.exec(e.field || "");
    return answer ? answer[1] + ": " + text : text;
  }

  // --- the user who signed up in this browser: a way back to their recommendations from any page ---
  var remembered = function (user) {
    try {
      if (user !== undefined) { localStorage.setItem("cfbUser", user); }
      return localStorage.getItem("cfbUser");
    } catch (e) { return null; }  // (storage off: no link, nothing else lost)
  };
  var showMyRecs = function () {
    var me = remembered(), myRecs = document.getElementById("my-recs");
    if (me && myRecs) {
      myRecs.href = "/user/" + encodeURIComponent(me);
      myRecs.title = "recommendations for " + me;
      myRecs.hidden = false;
    }
  };
  showMyRecs();
  // (a page shown again by Back or Forward is the one drawn before this browser signed up, script and all)
  window.addEventListener("pageshow", showMyRecs);

  // --- sign up ---------------------------------------------------------------------------------
  var signup = document.getElementById("signup");
  if (signup) {
    var sending = false;  // (a second submit while one is on its way would make a second user)
    var controlFor = function (field) {  // the form's control of an API error's field, if it has one
      var m = /^(answers|ratings)\.(.+)$/.exec(field || "");
      if (field === "user") { return document.getElementById("user-id"); }
      if (!m) { return null; }
      var attr = m[1] === "answers" ? "data-attr" : "data-item";
      return signup.querySelector("[" + attr + "=\"" + CSS.escape(m[2]) + "\"]");
    };
    signup.addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (sending) { return; }
      var err = document.getElementById("signup-error");
      err.textContent = "";
      signup.querySelectorAll("[aria-invalid]").forEach(function (el) {
        el.removeAttribute("aria-invalid");
        el.removeAttribute("aria-describedby");
      });
      var entry = { answers: {}, ratings: {}, asked: Number(signup.dataset.asked),
                    version: Number(signup.dataset.version) };
      var user = document.getElementById("user-id").value.trim();
      if (user) { entry.user = user; }
      signup.querySelectorAll("[data-attr]").forEach(function (el) {
        var v = el.value.trim();
        if (v === "") { return; }
        entry.answers[el.dataset.attr] = el.dataset.number ? Number(v) : v;
      });
      signup.querySelectorAll(".rate-items select").forEach(function (el) {
        if (el.value !== "") { entry.ratings[el.dataset.item] = Number(el.value); }
      });
      var button = document.getElementById("signup-submit");
      button.disabled = true;
      sending = true;
      api("POST", "/users", entry).then(function (out) {
        remembered(out.user);
        signup.reset();  // (done: Back brings the form back empty, not filled in to be sent again)
        window.location.href = "/user/" + encodeURIComponent(out.user);
      }).catch(function (e) {
        sending = false;
        err.textContent = pageMessage(e);
        button.disabled = false;
        // the control the error is about is marked and takes the focus (else the message does)
        var target = controlFor(e.field);
        if (target) {
          target.setAttribute("aria-invalid", "true");
          target.setAttribute("aria-describedby", "signup-error");
          target.focus();
        } else {
          err.focus();
        }
      });
    });
    // Back from the recommendations: the browser may restore this page as it was left, mid-submit
    window.addEventListener("pageshow", function () {
      sending = false;
      document.getElementById("signup-submit").disabled = false;
    });
  }

  // --- recommendations ---------------------------------------------------------------------------
  var recs = document.getElementById("recs");
  if (recs) {
    var user = recs.dataset.user;
    var scale = JSON.parse(recs.dataset.scale || "[1,2,3,4,5]");
    var status = document.getElementById("rate-status");
    var error = document.getElementById("rate-error");

    var given = document.getElementById("my-ratings"), ratingsShown = 0;
    var ratingSelect = function (it) {
      var sel = document.createElement("select");
      sel.name = "rate";
      sel.dataset.item = it.item;
      sel.setAttribute("aria-label", "rating for " + (it.title || it.item));
      var blank = document.createElement("option");
      blank.value = "";
      blank.textContent = "rate…";
      sel.appendChild(blank);
      scale.forEach(function (v) {
        var o = document.createElement("option");
        o.value = String(v);
        o.textContent = String(v);
        sel.appendChild(o);
      });
      return sel;
    };
    // ``sel`` showing ``value`` (a value its choices lack, 3.5 on a scale of whole stars, is added in order)
    var choose = function (sel, value) {
      if (value !== "" && !Array.prototype.some.call(sel.options, function (o) { return o.value === value; })) {
        var o = document.createElement("option"), after = null;
        o.value = value;
        o.textContent = value;
        Array.prototype.forEach.call(sel.options, function (x) {
          if (x.value !== "" && Number(x.value) < Number(value)) { after = x; }
        });
        sel.insertBefore(o, after ? after.nextSibling : sel.options[1] || null);
      }
      sel.value = value;
    };

    // a row of a list: the item's link, [its score,] its rating list (showing ``chosen``) and a button
    var row = function (it, score, chosen, buttonText, buttonLabel) {
      var li = document.createElement("li");
      li.dataset.item = it.item;
      var a = document.createElement("a");
      a.className = "title";
      a.href = "/item/" + encodeURIComponent(it.item);
      a.textContent = it.title || it.item;
      li.append(a, " ");
      if (score !== null) {
        var shown = document.createElement("span");
        shown.className = "score";
        shown.textContent = score;
        li.append(shown, " ");
      }
      var sel = ratingSelect(it);
      choose(sel, chosen);
      var button = document.createElement("button");
      button.type = "button";
      button.className = "rate";
      button.textContent = buttonText;
      button.setAttribute("aria-label", buttonLabel + " " + (it.title || it.item));
      li.append(sel, " ", button);
      return li;
    };
    // a list drawn again: a keyboard user goes on where they were, at the same control of the same item
    // (a rating changed moves to the top of the ratings given), else of the row at the same place
    var redrawList = function (list, rows) {
      var focused = document.activeElement, at = -1, kind = "select", item = null;
      if (focused && list.contains(focused)) {
        var li = focused.closest("li");
        at = Array.prototype.indexOf.call(list.children, li);
        item = li.dataset.item;
        kind = focused.tagName === "BUTTON" ? "button" : "select";
      }
      list.replaceChildren.apply(list, rows);
      if (at < 0 || !rows.length) { return; }
      var same = rows.filter(function (r) { return r.dataset.item === item; })[0];
      (same || rows[Math.min(at, rows.length - 1)]).querySelector(kind).focus();
    };
    var render = function (items) {
      redrawList(recs, items.map(function (it) { return row(it, Number(it.score).toFixed(2), "", "Rate", "rate"); }));
      var none = document.getElementById("no-recs");  // (said when every item is rated)
      if (none) { none.hidden = items.length > 0; }
    };

    // ratings in quick succession: each is sent once the one before it is answered (sent at once, they
    // went on separate connections and could be stored in another order: the last one chosen lost), and
    // a list (or status) older than the one shown is not drawn over it
    var started = 0, listShown = 0, statusShown = 0, writes = Promise.resolve();
    var shownAs = function (items) {  // a list as the page shows it: each item and its score
      return items.map(function (it) { return it.item + " " + Number(it.score).toFixed(2); }).join("\n");
    };
    var drawn = function () {
      return Array.prototype.map.call(recs.children, function (li) {
        return li.dataset.item + " " + li.querySelector(".score").textContent;
      }).join("\n");
    };
    // the user's list as the server has it now, unless a later one is shown (with ``ifChanged``: only
    // where it differs from the one on the page, whose choices a user may be making)
    var redraw = function (mine, ifChanged) {
      var url = "/users/" + encodeURIComponent(user) + "/recommendations?n=" + encodeURIComponent(recs.dataset.n || "10");
      return api("GET", url).then(function (out) {
        if (mine < listShown || (ifChanged && shownAs(out.items) === drawn())) { return; }
        listShown = mine;
        render(out.items);
        recs.dataset.updated = String(Date.now());
      });
    };
    // a rating is sent on an explicit choice (the row's Rate button, or Enter on its list), never as the
    // list's value moves: Chromium sends "change" on every arrow key of a closed list
    var rate = function (li) {
      var sel = li.querySelector("select");
      if (sel.value === "") { error.textContent = "Choose a rating first."; sel.focus(); return; }
      error.textContent = "";
      var mine = ++started;
      var base = "/users/" + encodeURIComponent(user);
      var body = { item: sel.dataset.item, rating: Number(sel.value) };
      var posted = writes.then(function () { return api("POST", base + "/ratings", body); });
      writes = posted.catch(function () {});
      posted
        .then(function (out) {
          if (mine > statusShown) {
            statusShown = mine;
            var named = document.createElement("bdi");  // (a right-to-left title would take the rating into its run)
            named.textContent = out.title || out.item;
            status.replaceChildren("Rated ", named, ": " + out.rating);
          }
          // (stored: a list that then fails to load says so, and the rating stays said as stored)
          return Promise.all([redraw(mine), redrawRatings(mine)]).catch(function (e) {
            error.textContent = "Stored; the lists could not be updated: " + pageMessage(e);
          });
        }, function (e) {
          if (mine >= statusShown) { status.textContent = ""; }  // (an older "Rated …" is not this rating's)
          error.textContent = pageMessage(e);
        });
    };
    // the ratings given, newest first: each list shows its value; choosing another and Change changes it
    var countText = function (count, shown) {
      if (!count) { return "None yet."; }
      return count > shown ? count.toLocaleString("en") + " in all; the latest " + shown + ", newest first:"
                           : count.toLocaleString("en") + ", newest first:";
    };
    var redrawRatings = function (mine) {
      if (!given) { return Promise.resolve(); }
      var shown = Number(given.dataset.n || "20");
      return api("GET", "/users/" + encodeURIComponent(user) + "/ratings?n=" + shown).then(function (out) {
        if (mine < ratingsShown) { return; }
        ratingsShown = mine;
        redrawList(given, out.ratings.map(function (it) {
          return row(it, null, String(it.rating), "Change", "change the rating of");
        }));
        document.getElementById("ratings-count").textContent = countText(out.count, shown);
      });
    };
    [recs, given].forEach(function (list) {
      if (!list) { return; }
      list.addEventListener("click", function (ev) {
        if (ev.target.tagName === "BUTTON" && ev.target.classList.contains("rate")) { rate(ev.target.closest("li")); }
      });
      list.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" && ev.target.tagName === "SELECT") { ev.preventDefault(); rate(ev.target.closest("li")); }
      });
    });
    // shown again from the browser's history (Back, Forward): the list as it was drawn then, or the
    // server's first one, may be stale (an item rated since still listed): fetch it afresh
    window.addEventListener("pageshow", function (ev) {
      var nav = performance.getEntriesByType ? performance.getEntriesByType("navigation")[0] : null;
      if (!ev.persisted && !(nav && nav.type === "back_forward")) { return; }
      var mine = ++started;
      Promise.all([redraw(mine, true), redrawRatings(mine)]).catch(function (e) { error.textContent = pageMessage(e); });
    });
  }
})();
