// A guest-like client of `uffd serve`: creates memory, registers it on a userfaultfd,
// hands the uffd over with either handshake, then reads, writes, forks, remaps,
// releases and unmaps it, checking every byte against the image.
#if canImport(Glibc)
import Glibc
#endif

guard let options = Options.parse(CommandLine.arguments) else {
    say(Options.usage)
    exit(2)
}
if options.scenario == "flood" { runFlood(options) }
if options.scenario == "restore-file" { restoreFromFile(options, write: options.pass == "write") }
runClient(options)
