// A small stand-in for Immich's web app, reproducing what the add-on relies on (reference §5.2):
// * an asset viewer at /…/photos/<uuid>: section#immich-asset-viewer, the navbar action strip
//   [data-testid="asset-viewer-navbar-actions"], the ⋮ button (aria-haspopup, aria-controls, aria-expanded)
//   and its ul[role=menu] of li[role=menuitem] that stays in the DOM while closed (max-height: 0);
// * labels in the language of localStorage 'lang' (Immich's setting), ids from a global counter (id-<n>);
// * client-side navigation (history.pushState, popstate) that destroys and re-renders the viewer, and a
//   Svelte-like re-render of the menu's own items (window.stubApp.rerenderItems());
// * a click anywhere outside the ⋮ button closes the menu; the menu's own items record their clicks.
// Routes: /photos/<id> and /albums/<album>/photos/<id> (viewer), /share/<key>/photos/<id> (a shared link: the
// menu is rendered here too, which Immich does not do, so the add-on's own URL check is what is tested),
// /changed/photos/<id> (a viewer whose DOM no longer has the contract), /photos/<NOT_FOUND> (Immich's error
// page for an asset that does not exist: no viewer at all), anything else (a plain page).

const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
const LABELS = {
  en: {
    more: 'More',
    items: ['Slideshow', 'Download', 'Download original', 'Add to album', 'Set as profile picture', 'Archive',
      'View in timeline', 'View similar photos'],
    jobs: ['Refresh faces', 'Refresh metadata', 'Refresh thumbnails'],
    next: 'Next',
  },
  zh: {
    more: '更多',
    items: ['幻灯片放映', '下载', '下载原件', '添加到相册', '设为头像', '归档', '在时间线中查看', '查看相似照片'],
    jobs: ['刷新人脸', '刷新元数据', '刷新缩略图'],
    next: '下一张',
  },
};
// Material Design–style icon paths (any 24×24 path will do: the add-on replaces it).
const ICON = 'M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20m0 4a6 6 0 1 1 0 12 6 6 0 0 1 0-12z';
const ITEM_CLASS =
  'w-full p-4 text-start text-sm font-medium text-immich-fg focus:outline-none focus:ring-2 focus:ring-inset ' +
  'cursor-pointer border-gray-200 flex gap-2 items-center hover:bg-gray-200';

let counter = 0;
const nextId = () => `id-${(counter += 1)}`;
const clicked = [];

function lang() {
  return /^zh/i.test(localStorage.getItem('lang') || '') ? 'zh' : 'en';
}

function el(tag, attrs = {}, children = []) {
  const node = tag === 'svg' || tag === 'path'
    ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function menuItem(label) {
  const li = el('li', { id: nextId(), role: 'menuitem', class: ITEM_CLASS }, [
    el('svg', { viewBox: '0 0 24 24', width: '18', height: '18', 'aria-hidden': 'true', class: 'shrink-0' }, [
      el('path', { d: ICON, fill: 'currentColor' }),
    ]),
    el('div', { class: 'w-full' }, [el('div', { class: 'flex justify-between' }, [label])]),
  ]);
  li.addEventListener('click', () => clicked.push(label));
  return li;
}

function fillMenu(ul) {
  // Svelte's {#each}/{#if} blocks insert before an anchor comment; foreign nodes are left where they are.
  for (const node of Array.from(ul.childNodes)) if (!node.hasAttribute || !node.hasAttribute('data-immich-zh-ai')) node.remove();
  const words = LABELS[lang()];
  const anchor = document.createComment('');
  ul.prepend(anchor);
  for (const label of words.items) ul.insertBefore(menuItem(label), anchor);
  ul.insertBefore(el('hr', { class: 'my-1 border-gray-300' }), anchor);
  for (const label of words.jobs) ul.insertBefore(menuItem(label), anchor);
}

function viewer(assetId, { changed = false } = {}) {
  const words = LABELS[lang()];
  const n = nextId().slice(3);
  const button = el('button', {
    id: `context-menu-button-id-${n}`,
    type: 'button',
    class: 'icon-button',
    'aria-label': words.more,
    title: words.more,
    'aria-haspopup': 'true',
    'aria-expanded': 'false',
    'aria-controls': `context-menu-id-${n}`,
  }, ['⋮']);
  const ul = el('ul', {
    id: `context-menu-id-${n}`,
    role: 'menu',
    'aria-labelledby': button.id,
    class: 'flex flex-col rounded-lg bg-immich-bg text-immich-fg',
  });
  fillMenu(ul);
  const wrap = el('div', { class: 'fixed z-70 menu-wrap', style: 'max-height: 0px' }, [ul]);
  button.addEventListener('click', () => {
    const open = button.getAttribute('aria-expanded') !== 'true';
    button.setAttribute('aria-expanded', String(open));
    // Like Immich's ContextMenu: as tall as the viewport allows, the list scrolls beyond that.
    wrap.style.maxHeight = open ? 'calc(100vh - 64px)' : '0px';
  });
  const strip = el('div', { class: 'actions' }, [
    el('button', { type: 'button', class: 'icon-button', title: 'Info' }, ['ⓘ']),
    el('button', { type: 'button', class: 'icon-button', title: 'Favorite' }, ['♡']),
    el('div', {}, [el('div', {}, [button]), el('div', {}, [wrap])]),
  ]);
  if (!changed) strip.setAttribute('data-testid', 'asset-viewer-navbar-actions');
  const next = el('button', { type: 'button', id: 'next-asset', class: 'pill' }, [words.next]);
  next.addEventListener('click', (event) => {
    event.preventDefault();
    const other = assetId === ASSETS[0] ? ASSETS[1] : ASSETS[0];
    navigate(location.pathname.replace(assetId, other));
  });
  return el('section', { id: 'immich-asset-viewer', class: 'viewer' }, [
    el('div', {}, [el('div', { class: 'navbar' }, [el('div', { class: 'title' }, ['←']), strip])]),
    el('div', { class: 'stage' }, [el('div', { class: 'photo', 'data-asset': assetId }, [assetId]), next]),
  ]);
}

const ASSETS = ['11111111-1111-4111-8111-111111111111', '22222222-2222-4222-8222-222222222222'];
const NOT_FOUND = '99999999-9999-4999-8999-999999999999';

function render() {
  const app = document.getElementById('app');
  const path = location.pathname;
  const changed = new RegExp(`^/changed/photos/(${UUID})$`).exec(path);
  const asset = new RegExp(`/photos/(${UUID})$`).exec(path);
  if (changed) app.replaceChildren(viewer(changed[1], { changed: true }));
  else if (asset && asset[1] === NOT_FOUND) {
    // SvelteKit's +error page: the asset could not be loaded, so no viewer is rendered.
    app.replaceChildren(el('main', { class: 'error' }, [el('h1', {}, ['404']), el('p', {}, ['Not Found'])]));
  } else if (asset) app.replaceChildren(viewer(asset[1]));
  else app.replaceChildren(el('main', { class: 'timeline' }, [el('h1', {}, ['Photos'])]));
}

function navigate(path) {
  history.pushState({}, '', path);
  // SvelteKit swaps the page after its load functions resolve: a tick later, not synchronously.
  setTimeout(render, 10);
}

document.addEventListener('click', (event) => {
  // Immich's ContextMenu: a click outside its button closes it.
  for (const button of document.querySelectorAll('button[aria-haspopup="true"][aria-expanded="true"]')) {
    if (!button.contains(event.target)) button.click();
  }
});
window.addEventListener('popstate', () => setTimeout(render, 10));

window.stubApp = {
  clicked,
  navigate,
  rerenderItems() {
    for (const ul of document.querySelectorAll('ul[role="menu"]')) fillMenu(ul);
  },
  rerender: render,
};

// Immich renders after its first API calls resolve, i.e. after deferred scripts (the add-on) have run.
setTimeout(render, 30);
