# gnuplot script written by scripts/bench-report.py: forward tokens/s against sequence length.
# Run it in this directory: gnuplot forward-vs-seq.gp  (writes forward-vs-seq.png)
if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
  set terminal pngcairo size 1520,640 font ",10"
} else {
  set terminal png size 1520,640
}
set output 'forward-vs-seq.png'
set logscale x 2
set logscale y 10
set grid
set xlabel 'sequence length N'
set ylabel 'forward tokens/s'
set key below maxrows 4 width -2 font ',8'
set format y '%.0s%c'
set multiplot layout 1,2 title 'muse bench: forward throughput (solid: B=1, dashed: largest B measured at each N)'
set title 'small (D=512, L=8, H=8)'
plot 'forward-vs-seq.dat' index 0 using 1:2 with linespoints lc rgb '#1f77b4' dt 1 pt 7 ps 0.6 title 'phase7-small B=1', \
     'forward-vs-seq.dat' index 1 using 1:2 with linespoints lc rgb '#1f77b4' dt 2 pt 7 ps 0.6 title 'phase7-small largest B', \
     'forward-vs-seq.dat' index 2 using 1:2 with linespoints lc rgb '#d62728' dt 1 pt 7 ps 0.6 title 'phase8-small B=1', \
     'forward-vs-seq.dat' index 3 using 1:2 with linespoints lc rgb '#d62728' dt 2 pt 7 ps 0.6 title 'phase8-small largest B', \
     'forward-vs-seq.dat' index 4 using 1:2 with linespoints lc rgb '#2ca02c' dt 1 pt 7 ps 0.6 title 'gpt-small B=1', \
     'forward-vs-seq.dat' index 5 using 1:2 with linespoints lc rgb '#2ca02c' dt 2 pt 7 ps 0.6 title 'gpt-small largest B', \
     'forward-vs-seq.dat' index 6 using 1:2 with linespoints lc rgb '#7f7f7f' dt 1 pt 7 ps 0.6 title 'peer-gpt-small B=1', \
     'forward-vs-seq.dat' index 7 using 1:2 with linespoints lc rgb '#7f7f7f' dt 2 pt 7 ps 0.6 title 'peer-gpt-small largest B'
set title 'medium (D=1024, L=16, H=16)'
plot 'forward-vs-seq.dat' index 8 using 1:2 with linespoints lc rgb '#1f77b4' dt 1 pt 7 ps 0.6 title 'phase7-medium B=1', \
     'forward-vs-seq.dat' index 9 using 1:2 with linespoints lc rgb '#1f77b4' dt 2 pt 7 ps 0.6 title 'phase7-medium largest B', \
     'forward-vs-seq.dat' index 10 using 1:2 with linespoints lc rgb '#d62728' dt 1 pt 7 ps 0.6 title 'phase8-medium B=1', \
     'forward-vs-seq.dat' index 11 using 1:2 with linespoints lc rgb '#d62728' dt 2 pt 7 ps 0.6 title 'phase8-medium largest B', \
     'forward-vs-seq.dat' index 12 using 1:2 with linespoints lc rgb '#2ca02c' dt 1 pt 7 ps 0.6 title 'gpt-medium B=1', \
     'forward-vs-seq.dat' index 13 using 1:2 with linespoints lc rgb '#2ca02c' dt 2 pt 7 ps 0.6 title 'gpt-medium largest B', \
     'forward-vs-seq.dat' index 14 using 1:2 with linespoints lc rgb '#7f7f7f' dt 2 pt 7 ps 0.6 title 'peer-gpt-medium largest B'
unset multiplot
