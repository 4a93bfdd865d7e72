// Longlens click bridge: runs as the js_on_load of a hidden gr.HTML (app/ui.py), with `trigger`.
// - any element with data-ll-open="<target>" (source chips, document names) or a class
//   ll-open-src-<turn>-<i> (sources inside chat messages) opens the source viewer;
// - a click on a heatmap cell (plotly_click on #ll-heatmap) sends "cell:<layer>:<column>";
//   a click on the HCA curve (#ll-hca) sends "pos:<token position>";
// - a folder dropped onto the corpus drop zone (#ll-drop) is walked and its files handed to the
//   zone's file input, each named by its path inside the folder (gradio itself only takes the
//   files of a drop, not folders).
(() => {
  if (window.__longlensBridge) { window.__longlensBridge.trigger = trigger; return; }
  const bridge = window.__longlensBridge = { trigger };
  const send = (target) => bridge.trigger('click', { ll_target: target });

  // chat messages are sanitized (no data- attributes): there the target is a class ll-open-src-T-I
  const targetOf = (el) => {
    if (el.hasAttribute('data-ll-open')) return el.getAttribute('data-ll-open');
    const m = /(?:^|\s)ll-open-src-(\d+)-(\d+)(?:\s|$)/.exec(el.className);
    return m ? `src:${m[1]}:${m[2]}` : null;
  };
  document.addEventListener('click', (ev) => {
    const el = ev.target.closest && ev.target.closest('[data-ll-open], [class*="ll-open-src-"]');
    const target = el && targetOf(el);
    if (!target) return;
    ev.preventDefault();
    ev.stopPropagation();
    document.querySelectorAll('.ll-chip-active').forEach((c) => c.classList.remove('ll-chip-active'));
    el.classList.add('ll-chip-active');
    send(target);
  }, true);

  const bind = () => {
    const heat = document.querySelector('#ll-heatmap .js-plotly-plot');
    if (heat && heat.on && heat.__llBound !== heat._fullData) {
      heat.__llBound = heat._fullData;
      heat.removeAllListeners && heat.removeAllListeners('plotly_click');
      heat.on('plotly_click', (d) => {
        const p = d.points && d.points[0];
        if (!p || p.z === null || Number.isNaN(p.z)) return;
        const layer = String(p.y).replace(/^L/, '');
        const col = Array.isArray(p.pointNumber) ? p.pointNumber[1] : p.pointIndex[1];
        send(`cell:${layer}:${col}`);
      });
    }
    const hca = document.querySelector('#ll-hca .js-plotly-plot');
    if (hca && hca.on && hca.__llBound !== hca._fullData) {
      hca.__llBound = hca._fullData;
      hca.removeAllListeners && hca.removeAllListeners('plotly_click');
      hca.on('plotly_click', (d) => {
        const p = d.points && d.points[0];
        if (p && typeof p.x === 'number') send(`pos:${Math.round(p.x)}`);
      });
    }
    const zone = document.querySelector('#ll-drop');
    if (zone && !zone.__llFolders) {
      zone.__llFolders = true;
      zone.addEventListener('drop', onDrop, true);
    }
  };
  setInterval(bind, 400);

  // ---- folders: keep each file's path inside the folder in its name ('/' as U+2215, since gradio
  // keeps only base names); hidden files and folders are left out, as ingestion does for folders
  const SKIP = /(^|\/)(\.[^/]*|__pycache__|node_modules)\//;
  const named = (f, path) => new File([f], path.split('/').join('\u2215'), { type: f.type });
  const hidden = (path) => SKIP.test(path) || path.split('/').pop().startsWith('.');

  document.addEventListener('change', (ev) => {
    const inp = ev.target;
    if (!(inp instanceof HTMLInputElement) || inp.type !== 'file' || !inp.webkitdirectory || !inp.files) return;
    const files = Array.from(inp.files);
    if (!files.some((f) => f.webkitRelativePath)) return;
    const dt = new DataTransfer();
    files.filter((f) => !hidden(f.webkitRelativePath || f.name))
      .forEach((f) => dt.items.add(named(f, f.webkitRelativePath || f.name)));
    inp.files = dt.files;
  }, true);

  // ---- folders dropped on the drop zone
  const readAll = (reader) => new Promise((resolve) => {
    const out = [];
    const next = () => reader.readEntries((batch) => {
      if (!batch.length) return resolve(out);
      out.push(...batch);
      next();
    }, () => resolve(out));
    next();
  });
  const walk = async (entry, prefix, files) => {
    if (entry.isFile) {
      const f = await new Promise((res) => entry.file(res, () => res(null)));
      if (f && !hidden(prefix + f.name)) files.push(named(f, prefix + f.name));
    } else if (entry.isDirectory && !hidden(prefix + entry.name + '/')) {
      for (const child of await readAll(entry.createReader())) await walk(child, prefix + entry.name + '/', files);
    }
  };
  async function onDrop(ev) {
    const items = ev.dataTransfer && ev.dataTransfer.items;
    if (!items) return;
    const entries = Array.from(items).map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    if (!entries.some((e) => e.isDirectory)) return; // plain files: gradio's own drop handler
    ev.preventDefault();
    ev.stopPropagation();
    const files = [];
    for (const e of entries) await walk(e, '', files);
    const input = document.querySelector('#ll-drop input[type=file]');
    if (!input || !files.length) return;
    const dt = new DataTransfer();
    files.forEach((f) => dt.items.add(f));
    input.files = dt.files;
    input.dispatchEvent(new Event('change', { bubbles: true }));
  }
})();
