"""Results -> figures, tables and a report; reads run directories (JSON) only and never imports torch.

- `analysis.results`: `load_run`, `load_runs`, `RunRecord`, `describe` (title text), `dataset_label`,
  `mean_std`, `families` (runs that differ only in their batch and trial), `stopping_rule`
- `analysis.style`: the colour rule (small batch blue, large batch red), `save_figure`, `write_csv`
- `analysis.keskar`: Keskar et al. 2017 Fig. 4 (`keskar_batch_size`), Fig. 5 warm starts
  (`keskar_piggyback`) and Fig. 5/6 (`keskar_sharpness_along_training`); `analysis.interpolation`:
  Figs. 3 and 7 (`plot_interpolation`)
- `analysis.masters_luschi`: `ml_accuracy_vs_lr`, `ml_best_vs_batch`, `ml_bn_heatmap`
- `analysis.accumulation`: `accumulation_curves`
- `analysis.noise`: `noise_scale_over_training`, `steps_vs_examples` (McCandlish et al. 2018)
- `analysis.hessian`: `hessian_eigenvalues_plot`, `hessian_density_plot`
- `analysis.tables`: `keskar_tables` (Keskar et al. 2017, Tables 2-4 and the distance ratio, per
  family, beside the paper's numbers); `analysis.ablation`: `keskar_ablation` (LB ÷ SB per family
  and probe BN mode)
- `analysis.headline`: the headline numbers of a probe record (`headlines`, `scalars`)
- `analysis.rank`: Kendall's τ, its bootstrap interval, Jiang et al. 2020's granulated τ Ψ
- `analysis.correlate`: `load_study`, `correlate`, `write_correlation` (`sharp correlate`); figures in
  `analysis.correlation_figures`; the paper's confirmed numbers in `analysis.jiang2020`
- `analysis.report`: `build_report` -> report.md with figures/*.png and the CSV behind each
"""
