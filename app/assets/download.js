// Every figure of the dashboard downloads from its mode bar: as PNG (plotly's camera button) and as SVG (the disk
// button added here). Set as plotly's default configuration the moment plotly.js defines window.Plotly, before any
// figure is drawn (a figure keeps the defaults it was first drawn with).
(function () {
  const name = (gd) => ((gd.layout && gd.layout.title && gd.layout.title.text) || "figure")
    .replace(/<[^>]*>/g, "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 80) || "figure";
  const configure = (Plotly) => Plotly.setPlotConfig({
    displaylogo: false,
    toImageButtonOptions: {format: "png", scale: 2},
    modeBarButtonsToAdd: [{
      name: "download-svg",
      title: "Download plot as SVG",
      icon: Plotly.Icons.disk,
      click: (gd) => Plotly.downloadImage(gd, {format: "svg", filename: name(gd)}),
    }],
  });
  if (window.Plotly) {
    configure(window.Plotly);
    return;
  }
  let plotly;
  Object.defineProperty(window, "Plotly", {
    configurable: true,
    enumerable: true,
    get: () => plotly,
    set: (value) => {
      plotly = value;
      if (value && value.setPlotConfig) configure(value);
    },
  });
})();
