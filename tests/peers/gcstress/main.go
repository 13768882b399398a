// gcstress forces garbage-collection cycles so that the agent's stop-the-world measurements can
// be compared with the runtime's own (run it with GODEBUG=gctrace=1: gctrace prints both STW
// phases of every cycle on stderr).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"runtime"
	"time"
)

var sink [][]byte

func main() {
	cycles := flag.Int("cycles", 60, "GC cycles to force")
	interval := flag.Duration("interval", 20*time.Millisecond, "pause between cycles")
	wait := flag.Bool("wait", false, "wait for a line on stdin before the work (forcing cycles or allocating)")
	sleep := flag.Duration("sleep", 0, "only sleep this long and exit (short-lived process)")
	delay := flag.Duration("delay", 0, "sleep this long before the work (a process that gives the agent this long to attach)")
	alloc := flag.Int("alloc-mb", 0, "allocate this many MiB of garbage without forcing GC, then exit (benchmark load)")
	flag.Parse()

	if *sleep > 0 {
		time.Sleep(*sleep)
		return
	}
	fmt.Println("ready")
	if *wait {
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			fmt.Fprintln(os.Stderr, "stdin:", err)
			os.Exit(1)
		}
	}
	time.Sleep(*delay)
	if *alloc > 0 {
		allocate(*alloc)
		return
	}
	for i := 0; i < *cycles; i++ {
		// Garbage and live data, so marking has work to do.
		for j := 0; j < 1000; j++ {
			sink = append(sink, make([]byte, 1024))
		}
		if len(sink) > 20000 {
			sink = sink[:0]
		}
		runtime.GC()
		time.Sleep(*interval)
	}
	fmt.Println("done")
}

// allocate churns through garbage while keeping a few MiB live: the runtime collects on its own.
// It prints the number of GC cycles it went through, so a benchmark can check that the agent
// reported two pauses for each.
func allocate(mib int) {
	live := make([][]byte, 4096)
	for i := 0; i < mib*1024; i++ {
		live[i%len(live)] = make([]byte, 1024)
	}
	var stats runtime.MemStats
	runtime.ReadMemStats(&stats)
	fmt.Printf("gc_cycles %d\n", stats.NumGC)
}
