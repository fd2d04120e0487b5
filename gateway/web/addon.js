/*
 * immich-zh-ai add-on for Immich's web app: adds "Regenerate OCR" and "Regenerate smart search" (for the
 * photo's owner) and "Find similar" (for anyone who may see it) to the asset viewer's ⋮ menu.
 *
 * Served by the gateway at /ai/addon.js; the nginx front injects <script src="/ai/addon.js" defer> into
 * Immich's HTML. Immich is a SvelteKit single-page app: navigation never reloads the page and Svelte
 * re-renders (or destroys) the viewer at will, so the menu is re-checked after every DOM mutation and the
 * asset id is read from the URL at click time.
 *
 * DOM contract (Immich 3.1, web/src/lib/components/asset-viewer/AssetViewerNavBar.svelte):
 *   [data-testid="asset-viewer-navbar-actions"] button[aria-haspopup="true"][aria-controls=ID]
 *   #ID = ul[role="menu"] > li[role="menuitem"] …   (the ul stays in the DOM while the menu is closed)
 * If Immich changes it, this script says so once with console.info and leaves the page alone.
 *
 * Everything runs inside try/catch: an add-on must never break the app it decorates. The only global is
 * window.__immichZhAi.
 */
(() => {
  'use strict';

  const NS = '__immichZhAi';
  const MARK = 'data-immich-zh-ai'; // on every node this script adds, so it can find (and never duplicate) them
  const LOG_PREFIX = '[immich-zh-ai]';
  // How long a viewer URL may show no menu before we conclude the DOM contract changed (Svelte renders the
  // viewer within a frame or two of navigation; 3 s also covers a slow asset fetch before the bar appears).
  const CONTRACT_GRACE_MS = 3000;
  const REQUEST_TIMEOUT_MS = 5 * 60 * 1000; // OCR of a large image on a busy CPU backend can take minutes
  const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
  // Every viewer route ends in /photos/<assetId>: /photos/<id>, /albums/<a>/photos/<id>, /search/photos/<id>…
  const ASSET_PATH = new RegExp(`/photos/(${UUID})/?$`, 'i');
  // Shared links (/share/<key>…, /s/<slug>…) are viewed by people without an account: nothing to offer.
  const SHARED_PATH = /^\/(share|s)(\/|$)/;

  const TEXT = {
    en: {
      ocr: 'Regenerate OCR',
      clip: 'Regenerate smart search',
      similar: 'Find similar',
      ocrBusy: 'Regenerating OCR…',
      clipBusy: 'Regenerating smart search…',
      ocrDone: (n) => `OCR done: ${n} ${n === 1 ? 'line' : 'lines'} of text found.`,
      ocrNone: 'OCR done: no text found.',
      clipDone: (model, dim) => `Smart search regenerated (${model}, ${dim} dimensions).`,
      ocrFailed: (why) => `Regenerate OCR failed: ${why}`,
      clipFailed: (why) => `Regenerate smart search failed: ${why}`,
      reloadHint: 'Reload the page to see the new text.',
      reload: 'Reload',
      close: 'Close',
      details: 'Details',
      // Short reasons for people, by what went wrong; the server's own detail is for admins, on /ai/.
      signIn: 'your Immich session has expired; sign in again.',
      notAllowed: 'only the owner of a photo can do this.',
      notFound: 'the photo was not found, or it has no preview yet.',
      notPossible: 'not possible for this photo (the video part of a motion photo, or switched off in Immich).',
      unavailable: 'the AI service is not available right now. Try again later.',
      tellAdmin: 'If this keeps happening, tell your Immich administrator.',
      seeDetails: 'The AI status page has the details.',
      noAsset: 'no photo id in the address.',
      badReply: 'unexpected reply from the server.',
    },
    zh: {
      ocr: '重新识别文字 (OCR)',
      clip: '重新生成智能搜索',
      similar: '查找相似照片',
      ocrBusy: '正在重新识别文字…',
      clipBusy: '正在重新生成智能搜索…',
      ocrDone: (n) => `文字识别完成：找到 ${n} 行文字。`,
      ocrNone: '文字识别完成：未发现文字。',
      clipDone: (model, dim) => `智能搜索已重新生成（${model}，${dim} 维）。`,
      ocrFailed: (why) => `重新识别文字失败：${why}`,
      clipFailed: (why) => `重新生成智能搜索失败：${why}`,
      reloadHint: '刷新页面即可看到新识别的文字。',
      reload: '刷新',
      close: '关闭',
      details: '详情',
      signIn: 'Immich 登录已过期，请重新登录。',
      notAllowed: '只有照片的所有者才能执行此操作。',
      notFound: '找不到这张照片，或它还没有预览图。',
      notPossible: '这张照片无法处理（动态照片的视频部分，或已在 Immich 中关闭该功能）。',
      unavailable: 'AI 服务暂时不可用，请稍后再试。',
      tellAdmin: '如果一直出现，请联系 Immich 管理员。',
      seeDetails: 'AI 状态页面有详细信息。',
      noAsset: '地址中没有照片 ID。',
      badReply: '服务器返回了无法识别的内容。',
    },
  };

  // Outline icons on a 24×24 grid, drawn like Immich's Material Design icons (one path, fill currentColor).
  const ICONS = {
    // scan corners around a "T": text recognition
    ocr: 'M4 4h5v2H6v3H4V4m11 0h5v5h-2V6h-3V4M4 15h2v3h3v2H4v-5m14 3v-3h2v5h-5v-2h3M8 8h8v2h-3v7h-2v-7H8V8z',
    // magnifier with a spark: smart (CLIP) search
    clip:
      'M9.5 3A6.5 6.5 0 0 1 16 9.5c0 1.61-.59 3.09-1.56 4.23l.27.27h.79l5 5-1.5 1.5-5-5v-.79l-.27-.27A6.52 6.52 0 0 1 ' +
      '9.5 16 6.5 6.5 0 0 1 3 9.5 6.5 6.5 0 0 1 9.5 3m0 2C7 5 5 7 5 9.5S7 14 9.5 14 14 12 14 9.5 12 5 9.5 5m0 1.5l.9 ' +
      '2.1 2.1.9-2.1.9-.9 2.1-.9-2.1-2.1-.9 2.1-.9.9-2.1z',
    // two overlapping pictures: "more like this"
    similar: 'M4 4h11v2H6v9H4V4m4 4h12v12H8V8m2 2v8h8v-8h-8m1 6l2-2.5 1.5 1.8 2-2.8L17 16h-6z',
  };
  // The owner gets the Regenerate items; anyone who may see the photo (a partner, an album member too) gets the
  // search by it, while Immich's smart search is on (else Immich's search page would ignore the photo).
  const OWNER_KINDS = ['ocr', 'clip'];
  const SEARCH_KINDS = ['similar'];

  const state = {
    infoShown: false,
    contractTimer: 0,
    scheduled: false,
    counter: 0,
    inFlight: new Set(),
    items: new Set(), // every item we inserted, so removing them never has to search the whole page
    toastStack: null,
    me: null, // Promise of the signed-in user ({id, isAdmin}) from Immich, asked once per sign-in
    smartSearch: null, // Promise of Immich's smartSearch feature flag (GET /api/server/features), asked once
    access: new Map(), // assetId -> our item kinds for the signed-in user (maybe none) | a pending Promise
  };
  const OWNED_CACHE = 500; // asset ids remembered; the oldest is forgotten first

  function info(message) {
    // Once per page: a changed Immich would otherwise log on every one of thousands of mutations.
    if (state.infoShown) return;
    state.infoShown = true;
    try {
      console.info(`${LOG_PREFIX} ${message}`);
    } catch (_) {
      /* a console that throws is not worth breaking the page for */
    }
  }

  function guard(fn) {
    return function guarded(...args) {
      try {
        return fn.apply(this, args);
      } catch (error) {
        info(`disabled after an unexpected error: ${error && error.message}`);
        return undefined;
      }
    };
  }

  // ---- what page is this --------------------------------------------------------------------------------

  function isSharedLinkPage(pathname) {
    return SHARED_PATH.test(pathname);
  }

  function assetIdFromPath(pathname) {
    if (isSharedLinkPage(pathname)) return null;
    const match = ASSET_PATH.exec(pathname);
    return match ? match[1].toLowerCase() : null;
  }

  function normaliseLang(code) {
    // svelte-persisted-store writes Immich's 'lang' raw ("zh-CN"); an older or foreign writer may have
    // JSON-encoded it ("\"zh-CN\""), so quotes are dropped too.
    return String(code || '')
      .trim()
      .replace(/^"+|"+$/g, '');
  }

  function languageOf(code) {
    // Immich's Chinese locales are zh_SIMPLIFIED, zh_Hans, zh_Hant (stored with '-': zh-SIMPLIFIED …) and
    // browsers say zh-CN / zh-TW / zh-HK; Cantonese (yue_Hant) is written in Chinese characters too.
    return /^(zh|yue)([-_]|$)/i.test(normaliseLang(code)) ? 'zh' : 'en';
  }

  function uiLanguage() {
    // Immich keeps the chosen language in localStorage 'lang'; without one it follows the browser's
    // languages (getPreferredLocale). <html lang> is not set by Immich 3.1 but is honoured if a later
    // version sets it.
    let code = '';
    try {
      code = normaliseLang(window.localStorage.getItem('lang'));
    } catch (_) {
      /* storage disabled: fall through to the browser's language */
    }
    if (!code) code = normaliseLang(document.documentElement.getAttribute('lang'));
    if (!code) code = (navigator.languages && navigator.languages[0]) || navigator.language || '';
    return languageOf(code);
  }

  function t() {
    return TEXT[uiLanguage()];
  }

  // ---- whose photo is this (Immich's API, as the signed-in user) -----------------------------------------

  async function immichJson(path) {
    const response = await fetch(path, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return response.json();
  }

  function currentUser() {
    if (!state.me) {
      state.me = immichJson('/api/users/me').catch((error) => {
        state.me = null; // asked again next time (a sign-in may be on its way)
        throw error;
      });
    }
    return state.me;
  }

  function smartSearchOn() {
    if (!state.smartSearch) {
      state.smartSearch = immichJson('/api/server/features')
        .then((features) => Boolean(features && features.smartSearch === true))
        .catch(() => false);
    }
    return state.smartSearch;
  }

  function kindsFor(assetId) {
    // -> the kinds of items to show when known (maybe none), null while Immich is being asked. Immich offers
    // its own per-photo jobs ("Refresh faces" …) only to the owner; a partner or album member who views the
    // photo gets none, and ours could only fail for them, so they follow the same rule. A search is theirs too.
    const known = state.access.get(assetId);
    if (Array.isArray(known)) return known;
    if (!known) {
      const asking = Promise.all([
        currentUser(),
        immichJson(`/api/assets/${encodeURIComponent(assetId)}`),
        smartSearchOn(),
      ])
        .then(([user, asset, search]) => [
          ...(user && asset && user.id && user.id === asset.ownerId ? OWNER_KINDS : []),
          ...(search ? SEARCH_KINDS : []),
        ])
        .catch(() => []) // not signed in, not visible, Immich unreachable: nothing to offer
        .then((kinds) => {
          state.access.set(assetId, kinds);
          if (state.access.size > OWNED_CACHE) state.access.delete(state.access.keys().next().value);
          schedule();
        });
      state.access.set(assetId, asking);
    }
    return null;
  }

  function forgetUser() {
    // Signing out and in as someone else happens without a page load in Immich's single-page app.
    state.me = null;
    state.smartSearch = null;
    state.access.clear();
  }

  // ---- the menu -----------------------------------------------------------------------------------------

  function findMenus() {
    // -> {found: [{button, list}], strips: how many action bars}. Several can exist for a moment while
    // Svelte swaps the viewer between two assets; each menu gets its items.
    const found = [];
    const strips = document.querySelectorAll('[data-testid="asset-viewer-navbar-actions"]');
    for (const strip of strips) {
      const buttons = strip.querySelectorAll('button[aria-haspopup="true"][aria-controls]');
      for (const button of buttons) {
        const list = document.getElementById(button.getAttribute('aria-controls'));
        if (list && list.tagName === 'UL' && list.getAttribute('role') === 'menu') {
          found.push({ button, list });
        }
      }
    }
    return { found, strips: strips.length };
  }

  function pickTemplate(list) {
    // Copy one of Immich's own items so ours look the same in every theme. The last plain item is the
    // closest kin ("Refresh thumbnails"); an item rendered highlighted (bg-…) or red would pass that on.
    const items = Array.from(list.children).filter(
      (el) => el.tagName === 'LI' && el.getAttribute('role') === 'menuitem' && !el.hasAttribute(MARK),
    );
    const plain = items.filter((el) => !/(^|\s)(bg-|text-red)/.test(el.getAttribute('class') || ''));
    return plain[plain.length - 1] || items[items.length - 1] || null;
  }

  function setIcon(item, kind) {
    const svg = item.querySelector('svg');
    if (!svg) return;
    const paths = svg.querySelectorAll('path');
    for (const extra of svg.querySelectorAll('title, desc, g > *:not(path)')) extra.remove();
    let path = paths[0];
    if (!path) {
      path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
      svg.appendChild(path);
    }
    for (let i = 1; i < paths.length; i += 1) paths[i].remove();
    svg.setAttribute('viewBox', '0 0 24 24');
    path.setAttribute('d', ICONS[kind]);
    path.setAttribute('fill', 'currentColor');
  }

  function setLabel(item, label) {
    // The label is the first non-blank text outside the icon; other text (a shortcut hint) is blanked.
    const walker = document.createTreeWalker(item, NodeFilter.SHOW_TEXT);
    let labelled = false;
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.nodeValue.trim() || node.parentElement.closest('svg')) continue;
      if (!labelled) {
        node.nodeValue = label;
        labelled = true;
      } else {
        node.nodeValue = '';
      }
    }
    if (!labelled) {
      const div = document.createElement('div');
      div.textContent = label;
      item.appendChild(div);
    }
  }

  function makeItem(template, kind, lang) {
    const item = template.cloneNode(true); // no listeners come along: Svelte's are not copied by cloneNode
    for (const attr of Array.from(item.attributes)) {
      if (!['class', 'role', 'tabindex', 'style'].includes(attr.name)) item.removeAttribute(attr.name);
    }
    for (const el of item.querySelectorAll('[id]')) el.removeAttribute('id');
    state.counter += 1;
    // Immich's keyboard navigation walks the menu's children by id, so ours need unique ones too.
    item.id = `immich-zh-ai-${kind}-${state.counter}`;
    item.setAttribute(MARK, kind);
    item.setAttribute('data-lang', lang);
    setIcon(item, kind);
    setLabel(item, TEXT[lang][kind]);
    item.addEventListener('click', guard(onItemClick));
    state.items.add(item);
    return item;
  }

  function ensureItems(list, kinds) {
    const template = pickTemplate(list);
    if (!template) {
      info('the asset viewer menu has no item to copy; Regenerate actions are unavailable.');
      return;
    }
    const lang = uiLanguage();
    const mine = [];
    for (const other of Array.from(list.querySelectorAll(`li[${MARK}]`))) {
      if (kinds.includes(other.getAttribute(MARK))) continue;
      other.remove(); // an item this user may not use on this photo
      state.items.delete(other);
    }
    for (const kind of kinds) {
      const existing = Array.from(list.querySelectorAll(`li[${MARK}="${kind}"]`));
      let item = existing.find((el) => el.parentElement === list);
      for (const extra of existing) {
        if (extra === item) continue;
        extra.remove();
        state.items.delete(extra);
      }
      if (!item) {
        item = makeItem(template, kind, lang);
      } else if (item.getAttribute('data-lang') !== lang) {
        setLabel(item, TEXT[lang][kind]);
        item.setAttribute('data-lang', lang);
      }
      mine.push(item);
    }
    // Keep ours last, after Immich's "Refresh …" job items, even when Svelte appends its own later.
    const elements = Array.from(list.children);
    const tail = elements.slice(-mine.length);
    if (tail.length !== mine.length || tail.some((el, i) => el !== mine[i])) list.append(...mine);
  }

  function removeAll() {
    for (const item of state.items) item.remove();
    state.items.clear();
  }

  function sync() {
    state.scheduled = false;
    for (const item of state.items) if (!item.isConnected) state.items.delete(item); // Svelte destroyed its menu
    const path = window.location.pathname;
    if (path.startsWith('/auth/')) forgetUser();
    const assetId = assetIdFromPath(path); // null on shared-link pages too
    if (!assetId) {
      // Most mutations happen here (the timeline scrolling): only an id lookup, no search of the page.
      if (state.items.size) removeAll();
      const viewer = !isSharedLinkPage(path) && document.getElementById('immich-asset-viewer');
      if (viewer && findMenus().found.length) {
        // A viewer whose address does not say which asset it shows: a click could hit the wrong one.
        info('the asset viewer is open but its address has no /photos/<id>; Regenerate actions are unavailable.');
      }
      return;
    }
    const { found } = findMenus();
    if (found.length) {
      window.clearTimeout(state.contractTimer);
      state.contractTimer = 0;
      const kinds = kindsFor(assetId);
      if (!kinds || !kinds.length) {
        // Nothing for this user here, or not known yet (the check calls schedule() when it is).
        if (state.items.size) removeAll();
        return;
      }
      for (const { list } of found) ensureItems(list, kinds);
      return;
    }
    // A viewer address without the menu: Svelte may still be rendering, or a slideshow hides the bar. Only
    // if it stays so is it worth one line (items are still added whenever the menu does appear).
    if (!state.contractTimer && !state.infoShown) {
      state.contractTimer = window.setTimeout(
        guard(() => {
          state.contractTimer = 0;
          if (!assetIdFromPath(window.location.pathname)) return;
          // No viewer at all (Immich's "not found" page for a deleted photo, an error page): nothing is
          // missing, so nothing is said.
          if (!document.getElementById('immich-asset-viewer')) return;
          const now = findMenus();
          if (now.found.length) return;
          info(
            now.strips
              ? "the asset viewer's action bar has no ⋮ menu where expected (Immich's web UI may have changed); doing nothing."
              : "the asset viewer's ⋮ menu was not found (Immich's web UI may have changed); doing nothing.",
          );
        }),
        CONTRACT_GRACE_MS,
      );
    }
  }

  function schedule() {
    // MutationObserver already batches per task; one check per batch, before the next paint.
    if (state.scheduled) return;
    state.scheduled = true;
    queueMicrotask(guard(sync));
  }

  // ---- acting -------------------------------------------------------------------------------------------

  function closeMenu(item) {
    // Immich closes the menu on any click outside its button, which includes ours; this covers a
    // version that does not (the button toggles, so it is only clicked while still open).
    const list = item.parentElement;
    window.setTimeout(
      guard(() => {
        const id = list && list.id;
        const button = id && document.querySelector(`button[aria-controls="${CSS.escape(id)}"]`);
        if (button && button.getAttribute('aria-expanded') === 'true') button.click();
      }),
      0,
    );
  }

  function similarSearchUrl(assetId) {
    // Immich's own search page searching by this photo, as its "View similar photos" opens it (Route.search:
    // /search?query=<the search terms as JSON>): Immich's smart search with queryAssetId compares the photo's
    // stored CLIP embedding with the user's library (the gateway hands that search to Immich unchanged).
    return `/search?query=${encodeURIComponent(JSON.stringify({ queryAssetId: assetId }))}`;
  }

  function onItemClick() {
    const kind = this.getAttribute(MARK);
    closeMenu(this);
    const text = t();
    const assetId = assetIdFromPath(window.location.pathname);
    if (kind === 'similar') {
      if (assetId) window.location.assign(similarSearchUrl(assetId));
      return;
    }
    if (!assetId) {
      showToast('error', (kind === 'ocr' ? text.ocrFailed : text.clipFailed)(text.noAsset));
      return;
    }
    const key = `${kind}:${assetId}`;
    if (state.inFlight.has(key)) return; // a double click must not queue the same work twice
    state.inFlight.add(key);
    regenerate(kind, assetId)
      .catch((error) => info(`regenerate failed unexpectedly: ${error && error.message}`))
      .finally(() => state.inFlight.delete(key));
  }

  function reasonOf(status) {
    // What went wrong, said for people. The server's detail (backend names, install commands …) is meant for
    // admins: the gateway keeps it on its status page (/ai/), linked from the toast for them.
    if (status === 401) return 'signIn';
    if (status === 403) return 'notAllowed';
    if (status === 404) return 'notFound';
    if (status === 409) return 'notPossible';
    return 'unavailable';
  }

  async function showFailure(toast, kind, reason) {
    const text = t();
    const failed = kind === 'ocr' ? text.ocrFailed : text.clipFailed;
    if (reason !== 'unavailable') {
      toast.update('error', failed(text[reason]));
      return;
    }
    let admin = false;
    try {
      admin = Boolean((await currentUser()).isAdmin);
    } catch (_) {
      /* not known: say what anyone may be told */
    }
    toast.update('error', `${failed(text.unavailable)} ${admin ? text.seeDetails : text.tellAdmin}`, { details: admin });
  }

  async function regenerate(kind, assetId) {
    const toast = showToast('busy', kind === 'ocr' ? t().ocrBusy : t().clipBusy);
    const controller = new AbortController();
    const timer = window.setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      // The user's own Immich session cookie goes along (same origin); the gateway checks it with Immich.
      response = await fetch(`/ai/assets/${encodeURIComponent(assetId)}/${kind}`, {
        method: 'POST',
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        signal: controller.signal,
      });
    } catch (_) {
      await showFailure(toast, kind, 'unavailable'); // unreachable, or no answer within the timeout
      return;
    } finally {
      window.clearTimeout(timer);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      /* an HTML error page from a proxy: reported by status below */
    }
    const text = t();
    const failed = kind === 'ocr' ? text.ocrFailed : text.clipFailed;
    if (!response.ok) {
      await showFailure(toast, kind, reasonOf(response.status));
      return;
    }
    if (kind === 'ocr') {
      const lines = body && Number.isInteger(body.lines) ? body.lines : null;
      if (lines === null) {
        toast.update('error', failed(text.badReply));
      } else if (lines === 0) {
        toast.update('info', text.ocrNone);
      } else {
        // Immich loads an asset's OCR boxes when the viewer opens it and offers no hook to re-fetch them
        // from outside, so a reload is what shows the new text.
        toast.update('ok', `${text.ocrDone(lines)} ${text.reloadHint}`, { reload: true });
      }
      return;
    }
    if (!body || !Number.isInteger(body.dimension) || typeof body.model !== 'string') {
      toast.update('error', failed(text.badReply));
      return;
    }
    toast.update('ok', text.clipDone(body.model, body.dimension));
  }

  // ---- toasts (in a shadow root: Immich's Tailwind reset and ours never meet) ---------------------------

  const TOAST_CSS = `
    :host { all: initial; }
    .stack { position: fixed; left: 50%; bottom: 24px; transform: translateX(-50%); z-index: 2147483000;
      display: flex; flex-direction: column; gap: 8px; align-items: center; pointer-events: none;
      font: 500 14px/1.4 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "WenQuanYi Zen Hei", sans-serif; }
    .toast { pointer-events: auto; display: flex; align-items: center; gap: 12px; max-width: min(560px, 90vw);
      padding: 12px 16px; border-radius: 12px; box-shadow: 0 4px 16px rgba(0,0,0,.25);
      background: #fff; color: #1f2937; border-left: 4px solid #4250af; }
    .dark .toast { background: #212121; color: #e5e7eb; }
    .toast[data-state="ok"] { border-left-color: #16a34a; }
    .toast[data-state="info"] { border-left-color: #4250af; }
    .toast[data-state="error"] { border-left-color: #dc2626; }
    .msg { flex: 1; overflow-wrap: anywhere; }
    .spin { width: 16px; height: 16px; border-radius: 50%; border: 2px solid #4250af; border-right-color: transparent;
      animation: spin .8s linear infinite; flex: none; }
    .toast:not([data-state="busy"]) .spin { display: none; }
    @keyframes spin { to { transform: rotate(360deg); } }
    button, a.details { font: inherit; cursor: pointer; border: 0; border-radius: 8px; padding: 4px 10px;
      background: #4250af; color: #fff; text-decoration: none; white-space: nowrap; }
    button.close { background: transparent; color: inherit; font-size: 18px; padding: 0 4px; line-height: 1; }
  `;

  function toastStack() {
    if (state.toastStack && state.toastStack.isConnected) return state.toastStack;
    // Created on first use only, so a page where nothing is clicked keeps its DOM untouched.
    const host = document.createElement('div');
    host.setAttribute(MARK, 'toasts');
    const root = host.attachShadow({ mode: 'open' });
    const style = document.createElement('style');
    style.textContent = TOAST_CSS;
    const stack = document.createElement('div');
    stack.className = 'stack';
    stack.setAttribute('role', 'status');
    stack.setAttribute('aria-live', 'polite');
    root.append(style, stack);
    document.body.appendChild(host);
    state.toastStack = stack;
    return stack;
  }

  function showToast(kind, message, options) {
    const stack = toastStack();
    const el = document.createElement('div');
    el.className = 'toast';
    const spin = document.createElement('div');
    spin.className = 'spin';
    const msg = document.createElement('div');
    msg.className = 'msg';
    const close = document.createElement('button');
    close.className = 'close';
    close.type = 'button';
    close.textContent = '×';
    close.addEventListener('click', () => el.remove());
    el.append(spin, msg);
    let hideTimer = 0;
    const toast = {
      element: el,
      update: guard((next, text, opts) => {
        el.setAttribute('data-state', next);
        msg.textContent = text; // textContent: a server's detail is shown, never interpreted as HTML
        const words = t();
        close.setAttribute('aria-label', words.close);
        for (const old of el.querySelectorAll('button, a')) old.remove();
        if (opts && opts.reload) {
          const reload = document.createElement('button');
          reload.type = 'button';
          reload.className = 'reload';
          reload.textContent = words.reload;
          reload.addEventListener('click', () => window.location.reload());
          el.append(reload);
        }
        if (opts && opts.details) {
          const details = document.createElement('a');
          details.className = 'details';
          details.href = '/ai/#failures';
          details.target = '_blank';
          details.rel = 'noopener';
          details.textContent = words.details;
          el.append(details);
        }
        if (next !== 'busy') el.append(close);
        window.clearTimeout(hideTimer);
        // Errors stay until closed; outcomes with an action stay longer than plain confirmations.
        if (next === 'ok' || next === 'info') {
          hideTimer = window.setTimeout(() => el.remove(), opts && opts.reload ? 20000 : 8000);
        }
        stack.classList.toggle('dark', document.documentElement.classList.contains('dark'));
      }),
    };
    toast.update(kind, message, options);
    stack.appendChild(el);
    return toast;
  }

  // ---- start --------------------------------------------------------------------------------------------

  try {
    if (window[NS]) return; // injected twice (e.g. two proxies): the first copy does the work
    Object.defineProperty(window, NS, {
      value: Object.freeze({
        version: '1',
        // For support and tests: what the add-on currently sees.
        language: guard(uiLanguage),
        languageOf: guard(languageOf),
        assetId: guard(() => assetIdFromPath(window.location.pathname)),
        similarSearchUrl: guard(similarSearchUrl),
      }),
      configurable: false,
      enumerable: false,
      writable: false,
    });
    if (!('MutationObserver' in window) || !('fetch' in window)) {
      info('this browser lacks MutationObserver or fetch; Regenerate actions are unavailable.');
      return;
    }
    new MutationObserver(guard(schedule)).observe(document.documentElement, { childList: true, subtree: true });
    // Language changes re-render text in place (no childList mutation): check again when the menu opens.
    document.addEventListener('click', guard(schedule), true);
    window.addEventListener('popstate', guard(schedule));
    window.addEventListener('storage', guard(schedule));
    schedule();
  } catch (error) {
    info(`disabled after an unexpected error: ${error && error.message}`);
  }
})();
