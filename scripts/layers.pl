#!/usr/bin/env perl
# Checks the layer rules of docs/design.md ("Layers") on src/:
#   - no import circles between modules (a module is one file; mod.rs is its
#     directory's module);
#   - each module imports only from its own layer or the layers below it
#     (front > plan > persist > formats > io > leaves);
#   - the leaves import only leaves.
# An import is any `crate::` path (in a `use` line or inline), a `super::` or
# `self::` path, or a path through a child module (`dm::run_steps`); in
# main.rs `livestick::` is `crate::`. Comments, string literals and
# `#[cfg(test)]` modules are left out: tests may build fixtures from anywhere.
# Perl because it is on every Debian machine (perl-base is essential), so CI
# needs nothing more. Prints every finding and exits 1 if there is one;
# `--edges` prints the import graph instead.
use strict;
use warnings;
use File::Find;

my $dump = @ARGV && $ARGV[0] eq "--edges" ? shift : undef;
my $root = shift // "src";
my %files;    # module name ("persist/merge/plan") → file
find(
    sub {
        return unless /\.rs$/;
        my $rel = $File::Find::name;
        $rel =~ s{^\Q$root\E/}{};
        my $module = $rel;
        $module =~ s{\.rs$}{};
        $module =~ s{/mod$}{};
        $files{$module} = $File::Find::name;
    },
    $root
);
delete $files{lib};    # declares the modules and imports nothing

# The layers, top first, by the module's first path segment.
my @layers = (
    [ front   => qw(main cli commands) ],
    [ plan    => qw(plan prepare write_facts apply batch live_source manifest restore raw_inspect raw_write write_report) ],
    [ persist => qw(persist) ],
    [ formats => qw(disk source boot squash squash_dir) ],
    [ io      => qw(io) ],
    [ leaves  => qw(size tools progress layout error bytes) ],
);
my (%rank, %layer_name);
for my $i ( 0 .. $#layers ) {
    my ( $name, @tops ) = @{ $layers[$i] };
    for my $top (@tops) {
        $rank{$top}       = $i;
        $layer_name{$top} = $name;
    }
}
sub top_of { ( split m{/}, $_[0] )[0] }

my @findings;
for my $module ( sort keys %files ) {
    my $top = top_of($module);
    push @findings, "$files{$module}: module `$module` is in no layer (add it to scripts/layers.pl and docs/design.md)"
      unless exists $rank{$top};
}

# Source text without comments, strings, char literals and test modules.
sub code_of {
    my ($path) = @_;
    open my $fh, '<', $path or die "$path: $!";
    local $/;
    my $text = <$fh>;
    close $fh;
    # One pass so that a `//` inside a string is not a comment and a quote
    # inside a comment is not a string; line breaks are kept for line numbers.
    $text =~ s{
        (//[^\n]*)
      | (/\*.*?\*/)
      | (r(\#*)".*?"\4)
      | ("(?:[^"\\]|\\.)*")
      | ('(?:[^'\\\n]|\\[^\n]{1,9})')
    }{ my $m = $&; (my $keep = $m) =~ s/[^\n]//g; $keep }gsex;
    # Drop `#[cfg(test)] mod name { … }` by brace matching.
    while ( $text =~ /#\[cfg\(test\)\]\s*(?:pub\s+)?mod\s+\w+\s*\{/g ) {
        my $start = $-[0];
        my $depth = 1;
        my $pos   = pos($text);
        while ( $depth > 0 && $pos < length $text ) {
            my $c = substr $text, $pos++, 1;
            $depth++ if $c eq '{';
            $depth-- if $c eq '}';
        }
        my $cut = substr $text, $start, $pos - $start;
        ( my $keep = $cut ) =~ s/[^\n]//g;
        substr( $text, $start, $pos - $start ) = $keep;
        pos($text) = $start;
    }
    return $text;
}

# Expands a use tree ("a::{b, c::{d, self}}") into flat paths.
sub expand {
    my ($tree) = @_;
    $tree =~ s/\s+//g;
    $tree =~ s/\bas\w+//g;
    return ($tree) unless $tree =~ /\{/;
    my ( $prefix, $inner ) = $tree =~ /^(.*?)\{(.*)\}$/s or return ($tree);
    my ( @parts, $depth, $cur );
    ( $depth, $cur ) = ( 0, '' );
    for my $c ( split //, $inner ) {
        if    ( $c eq '{' ) { $depth++ }
        elsif ( $c eq '}' ) { $depth-- }
        if ( $c eq ',' && $depth == 0 ) { push @parts, $cur; $cur = ''; next }
        $cur .= $c;
    }
    push @parts, $cur if length $cur;
    return map { my $p = $_; $p eq 'self' ? ( $prefix =~ s/::$//r ) : map { "$prefix$_" } expand($p) } @parts;
}

# The module a path names: its longest prefix that is a module file.
sub resolve {
    my ( $module, @segments ) = @_;
    my @base;
    if ( $segments[0] eq 'crate' ) {
        shift @segments;
    }
    elsif ( $segments[0] eq 'self' || $segments[0] eq 'super' ) {
        @base = split m{/}, $module;
        while ( @segments && ( $segments[0] eq 'self' || $segments[0] eq 'super' ) ) {
            pop @base if shift(@segments) eq 'super';
        }
    }
    else {
        @base = split m{/}, $module;    # a child module's name
    }
    my @path = @base;
    my $found;
    $found = join '/', @path if @path && exists $files{ join '/', @path };
    for my $seg (@segments) {
        push @path, $seg;
        my $name = join '/', @path;
        last unless exists $files{$name};
        $found = $name;
    }
    return $found;
}

my %edges;    # from → to → first "file:line"
for my $module ( sort keys %files ) {
    my $code     = code_of( $files{$module} );
    my @children = grep { m{^\Q$module\E/[^/]+$} } keys %files;
    my %child    = map { ( split m{/} )[-1] => 1 } @children;
    my @paths;    # [line, path]
    my $note = sub {
        my ( $offset, $path ) = @_;
        my $line = 1 + ( () = substr( $code, 0, $offset ) =~ /\n/g );
        push @paths, [ $line, $path ];
    };
    my %alias;    # a module imported by name (`use crate::persist::merge;`)
    while ( $code =~ /\buse\s+([^;]+);/g ) {
        my $offset = $-[0];
        my $tree   = $1;
        for my $p ( expand($tree) ) {
            $note->( $offset, $p );
            my @segments = split /::/, ( $module eq 'main' ? $p =~ s/^livestick::/crate::/r : $p );
            next unless @segments > 1 && $segments[0] =~ /^(?:crate|super|self)$/;
            my $to = resolve( $module, @segments );
            $alias{ $segments[-1] } = $to
              if defined $to && ( split m{/}, $to )[-1] eq $segments[-1];
        }
    }
    my $crate = $module eq 'main' ? qr/(?:crate|livestick)/ : qr/crate/;
    while ( $code =~ /(?<![\w:])((?:$crate|super|self)(?:::\w+)+)/g ) {
        my ( $at, $path ) = ( $-[1], $1 );
        $note->( $at, $path );
    }
    delete $alias{$_} for keys %child;
    if (%alias) {
        my $names = join '|', map { quotemeta } keys %alias;
        while ( $code =~ /(?<![\w:])((?:$names)(?:::\w+)+)/g ) {
            my ( $at, $path ) = ( $-[1], $1 );
            my ( $name, @rest ) = split /::/, $path;
            my $line = 1 + ( () = substr( $code, 0, $at ) =~ /\n/g );
            my $to = resolve( $alias{$name}, 'self', @rest );
            $edges{$module}{$to} //= "$files{$module}:$line" if defined $to && $to ne $module;
        }
    }
    if (%child) {
        my $names = join '|', map { quotemeta } keys %child;
        while ( $code =~ /(?<![\w:])((?:$names)(?:::\w+)+)/g ) {
            my ( $at, $path ) = ( $-[1], $1 );
            $note->( $at, $path );
        }
    }
    for (@paths) {
        my ( $line, $path ) = @$_;
        $path =~ s/^livestick::/crate::/ if $module eq 'main';
        my @segments = split /::/, $path;
        next unless @segments;
        next unless $segments[0] =~ /^(?:crate|super|self)$/ || $child{ $segments[0] };
        my $to = resolve( $module, @segments );
        next if !defined $to || $to eq $module || $to eq 'lib';
        $edges{$module}{$to} //= "$files{$module}:$line";
    }
}

if ($dump) {
    for my $from ( sort keys %edges ) {
        print "$from → $_ ($edges{$from}{$_})\n" for sort keys %{ $edges{$from} };
    }
    exit 0;
}

# Layer rule: never import from a layer above.
for my $from ( sort keys %edges ) {
    for my $to ( sort keys %{ $edges{$from} } ) {
        my ( $ft, $tt ) = ( top_of($from), top_of($to) );
        next unless exists $rank{$ft} && exists $rank{$tt};
        if ( $rank{$tt} < $rank{$ft} ) {
            push @findings, "$edges{$from}{$to}: `$from` ($layer_name{$ft}) imports `$to` ($layer_name{$tt}), a layer above it";
        }
    }
}

# Circles: strongly connected components (Tarjan).
my ( $index, @stack, %on, %idx, %low, @sccs ) = (0);
sub connect_from {
    my ($v) = @_;
    $idx{$v} = $low{$v} = $index++;
    push @stack, $v;
    $on{$v} = 1;
    for my $w ( sort keys %{ $edges{$v} // {} } ) {
        if ( !exists $idx{$w} ) {
            connect_from($w);
            $low{$v} = $low{$w} if $low{$w} < $low{$v};
        }
        elsif ( $on{$w} ) {
            $low{$v} = $idx{$w} if $idx{$w} < $low{$v};
        }
    }
    if ( $low{$v} == $idx{$v} ) {
        my @scc;
        while (1) {
            my $w = pop @stack;
            $on{$w} = 0;
            push @scc, $w;
            last if $w eq $v;
        }
        push @sccs, [ sort @scc ] if @scc > 1;
    }
}
for my $v ( sort keys %files ) { connect_from($v) unless exists $idx{$v} }
for my $scc (@sccs) {
    my %in = map { $_ => 1 } @$scc;
    my @why;
    for my $from (@$scc) {
        for my $to ( sort keys %{ $edges{$from} } ) {
            push @why, "    $edges{$from}{$to}: `$from` → `$to`" if $in{$to};
        }
    }
    push @findings, join "\n", "import circle: " . join( ', ', map {"`$_`"} @$scc ), @why;
}

if (@findings) {
    print "$_\n" for @findings;
    printf "layers: %d finding%s (docs/design.md, \"Layers\")\n", scalar @findings, @findings == 1 ? '' : 's';
    exit 1;
}
print "layers: no circles, nothing imports from above\n";
